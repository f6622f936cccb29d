"""Giving freed heap back to the system after a burst of connections.

gRPC allocates a connection's handshake state on its own threads, so glibc's malloc
spreads it over per-thread arenas, and frees it there; it returns memory to the system
only from the top of the main arena. Measured: 2,000 half-open connections to the main
port left the RSS 90 MiB higher once every one of them was closed (87 → 177 MiB), and
each further flood added more; `malloc_trim(0)` gave it back (94 MiB) in 20 ms
(`tests/benchmarks/coordinator_flood.py --runs main:1` shows the RSS before, during and
after such a flood).

So every `CHECK_S` the coordinator reads its RSS and, when it has grown by `GROWTH_MIB`
since the last trim (or the start), calls `malloc_trim(0)` on a worker thread (ctypes
releases the GIL for the call: the loop never waits for it). A coordinator that grows
because it holds more donors trims once per `GROWTH_MIB`, which frees little and costs
little. Only glibc has malloc_trim, and only Linux has /proc/self/statm; elsewhere
this does nothing.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import os
from collections.abc import Callable

log = logging.getLogger(__name__)

CHECK_S = 10.0
GROWTH_MIB = 16.0
MIB = 1024 * 1024


def rss_mib() -> float | None:
    """This process's resident set (MiB), or None where /proc/self/statm is missing."""
    try:
        with open("/proc/self/statm") as statm:
            resident_pages = int(statm.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return resident_pages * os.sysconf("SC_PAGE_SIZE") / MIB


def _malloc_trim() -> Callable[[], object] | None:
    """glibc's malloc_trim(0) as a callable, or None on another C library."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return lambda: trim(0)


async def trim_after_growth(check_s: float = CHECK_S, growth_mib: float = GROWTH_MIB) -> None:
    """Run until cancelled: trim the heap whenever the RSS grew by `growth_mib`."""
    trim = _malloc_trim()
    floor = rss_mib()
    if trim is None or floor is None:
        return
    while True:
        await asyncio.sleep(check_s)
        now = rss_mib()
        if now is None:
            continue
        if now - floor < growth_mib:
            floor = min(floor, now)  # growth counts from the lowest point since
            continue
        await asyncio.to_thread(trim)
        after = rss_mib() or now
        if now - after >= 1:
            log.info("gave %.0f MiB of freed heap back to the system (RSS now %.0f MiB)",
                     now - after, after)  # fmt: skip
        floor = after
