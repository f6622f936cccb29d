"""Keep CPython's full garbage collections short in a process holding thousands of streams.

Measured (tests/benchmarks/coordinator_load.py, one core): with 5,000–10,000 donor
streams the objects that live as long as a connection number in the millions, and every
full (generation 2) collection walked all of them — 0.5 s at 5,000 donors, 1.5 s at
10,000, every 5–10 s — which made the p99 ack latency and most of the CPU.

`gc.freeze()` moves every object alive now into a permanent generation that collections
do not walk; what is allocated later is collected as usual. Freezing again every few
seconds keeps the walked set small. The price: cyclic garbage among frozen objects is
not reclaimed until the next `reclaim` — a full collection with everything unfrozen,
done rarely (one long pause every `reclaim_every`).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from datetime import timedelta

log = logging.getLogger(__name__)


async def freeze_periodically(
    every: timedelta = timedelta(seconds=5), reclaim_every: timedelta = timedelta(minutes=15)
) -> None:
    """Run forever (cancel to stop)."""
    gc.freeze()
    last_reclaim = time.monotonic()
    while True:
        await asyncio.sleep(every.total_seconds())
        if time.monotonic() - last_reclaim >= reclaim_every.total_seconds():
            started = time.perf_counter()
            gc.unfreeze()
            found = gc.collect()
            last_reclaim = time.monotonic()
            log.debug(
                "full collection: %d unreachable objects in %.0f ms",
                found,
                (time.perf_counter() - started) * 1000,
            )
        gc.freeze()
