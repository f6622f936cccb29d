"""Runs `donor-coordinator` with two probes for `coordinator_load.py`; changes nothing else.

    python -m tests.benchmarks.coordinator_probe PROBE_FILE [--gc T0,T1,T2]
        [--switch-interval S] -- CLI-ARGS...

Into PROBE_FILE, one line each (times are `time.monotonic()`, as in every process):

- `gc T GEN MS`: a garbage collection of the oldest generation, or any taking ≥ 5 ms
  (the whole process stops meanwhile);
- `lag T MS`: the event loop woke ≥ 5 ms late from a 10 ms sleep (it was busy, or
  waiting for the GIL, for that long);
- `ticks T N`: once a second, how many loop-lag samples were taken in that second;
- `flush T MS`: `Fleet.flush` (the batched store writes, once a second) started at T
  and took MS (wrapped, not changed; skipped should the method ever be renamed).

Experiments (`coordinator_load.py --coordinator-gc / --coordinator-switch-interval`),
none by default: --gc calls `gc.set_threshold(T0, T1, T2)` and --switch-interval
`sys.setswitchinterval(S)` before the coordinator starts.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import sys
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TextIO

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

LAG_SLEEP_S = 0.010
LAG_NOTE_MS = 5.0
GC_NOTE_MS = 5.0


class Probe:
    def __init__(self, out: TextIO) -> None:
        self.out = out
        self._gc_began = 0.0

    def on_gc(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._gc_began = time.perf_counter()
            return
        ms = (time.perf_counter() - self._gc_began) * 1000
        if info["generation"] == 2 or ms >= GC_NOTE_MS:
            self.out.write(f"gc {time.monotonic():.3f} {info['generation']} {ms:.2f}\n")

    async def watch_loop(self) -> None:
        ticks, second = 0, int(time.monotonic())
        while True:
            before = time.monotonic()
            await asyncio.sleep(LAG_SLEEP_S)
            now = time.monotonic()
            late_ms = (now - before - LAG_SLEEP_S) * 1000
            if late_ms >= LAG_NOTE_MS:
                self.out.write(f"lag {now:.3f} {late_ms:.1f}\n")
            ticks += 1
            if int(now) != second:
                self.out.write(f"ticks {now:.3f} {ticks}\n")
                ticks, second = 0, int(now)

    def wrap_flush(self) -> None:
        from donor_app.coordinator import fleet

        flush = getattr(fleet.Fleet, "flush", None)
        if flush is None:
            return
        out = self.out

        async def timed_flush(self: Any) -> None:
            began = time.monotonic()
            try:
                await flush(self)
            finally:
                out.write(f"flush {began:.3f} {(time.monotonic() - began) * 1000:.1f}\n")

        fleet.Fleet.flush = timed_flush  # type: ignore[method-assign]


def main() -> int:
    split = sys.argv.index("--")
    parser = argparse.ArgumentParser()
    parser.add_argument("probe_file")
    parser.add_argument("--gc", default="")
    parser.add_argument("--switch-interval", type=float, default=None)
    args = parser.parse_args(sys.argv[1:split])
    probe = Probe(open(args.probe_file, "a", buffering=1))  # noqa: SIM115 (lives as we do)
    gc.callbacks.append(probe.on_gc)
    if args.gc:
        gc.set_threshold(*(int(x) for x in args.gc.split(",")))
    if args.switch_interval is not None:
        sys.setswitchinterval(args.switch_interval)

    real_run = asyncio.run

    def run_with_probe(main_coroutine: Coroutine[Any, Any, Any], **kwargs: Any) -> Any:
        async def both() -> Any:
            watcher = asyncio.create_task(probe.watch_loop())
            try:
                return await main_coroutine
            finally:
                watcher.cancel()

        return real_run(both(), **kwargs)

    asyncio.run = run_with_probe  # type: ignore[assignment]
    probe.wrap_flush()
    from donor_app.coordinator.cli import main as coordinator_main

    return coordinator_main(sys.argv[split + 1 :])


if __name__ == "__main__":
    raise SystemExit(main())
