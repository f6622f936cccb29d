"""How closely the suspend/resume duty cycle keeps its cap on a real thread and clock.

The unit tests check the cycle's schedule on a virtual clock; this measures what a busy
machine makes of it. Per cap (20/50/80 %, the product's 100 ms period):

- fake_guest: a guest whose suspend/resume only note the time. `run_percent` is the
  share of the window it was running; `late_ms` how far each call came after its
  scheduled time (anchored at the least late one; p50/p99/max).
- qemu (unless --no-qemu): the tiny guest burning CPU under the duty cycle instead of
  cputune (`cpu_cap_mode="duty-cycle"`, as on qemu:///session), its QEMU process's CPU
  use in percent of one core.

Target: within ±3 points of each cap (as for the cputune cap in hypervisor_ops.py).
`cores` and `load_1m` say how busy the machine was. The last line printed is one JSON
object.

    python tests/benchmarks/duty_cycle.py [--window 3] [--no-qemu]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from donor_app.hypervisor.dutycycle import DutyCycler
from donor_app.hypervisor.host import Hypervisor
from donor_app.hypervisor.images import ImageCache
from tests.benchmarks.stats import percentile
from tests.guests import add_tiny_guest, console_ticks, qemu_uri, shared_tmp_dir, tiny_guest_spec
from tests.waiting import wait_for

CAPS = (20, 50, 80)
PERIOD_S = 0.1  # DutyCycler's default, the one the hypervisor uses
GUEST = "duty"


class TimedGuest:
    """Notes when it was suspended and resumed (called on the cycler's thread)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.calls: list[tuple[float, str]] = []

    def suspend(self) -> None:
        with self.lock:
            self.calls.append((time.monotonic(), "suspend"))

    def resume(self) -> None:
        with self.lock:
            self.calls.append((time.monotonic(), "resume"))


def fake_guest(cap: int, window_s: float) -> dict[str, object]:
    guest = TimedGuest()
    cycler = DutyCycler(GUEST, guest.suspend, guest.resume, cap, period_s=PERIOD_S)
    started = time.monotonic()
    cycler.start()
    time.sleep(window_s)  # the measurement window itself
    cycler.stop()
    ended = time.monotonic()
    with guest.lock:
        calls = list(guest.calls)
    # Running from the start and after each resume, until the next suspend (or the end).
    ran, running_since = 0.0, started
    for at, call in calls:
        if call == "suspend" and running_since is not None:
            ran += at - running_since
            running_since = None
        elif call == "resume":
            running_since = at
    if running_since is not None:
        ran += ended - running_since
    # Call k (suspends and resumes in turn) is due at k // 2 periods plus the on-time for
    # a suspend; the least late call anchors the schedule.
    on_s = PERIOD_S * cap / 100
    due = [(k // 2) * PERIOD_S + (on_s if k % 2 == 0 else PERIOD_S) for k in range(len(calls))]
    offsets = [at - d for (at, _), d in zip(calls, due, strict=True)]
    anchor = min(offsets)
    late_ms = [(o - anchor) * 1000 for o in offsets]
    return {
        "run_percent": round(100 * ran / (ended - started), 2),
        "cycles": len(calls) // 2,
        "late_ms": {
            "p50": round(percentile(late_ms, 50), 2),
            "p99": round(percentile(late_ms, 99), 2),
            "max": round(max(late_ms), 2),
        },
    }


def cpu_percent(hv: Hypervisor, seconds: float) -> float:
    """The QEMU process's CPU use over `seconds`, in percent of one core."""
    before, start = hv.usage(GUEST).cpu_seconds, time.monotonic()
    time.sleep(seconds)  # the measurement window itself
    return 100 * (hv.usage(GUEST).cpu_seconds - before) / (time.monotonic() - start)


def qemu_guest(window_s: float) -> dict[str, object]:
    workdir = shared_tmp_dir(Path(tempfile.mkdtemp(prefix="ddc-", dir="/tmp")))
    try:
        cache = ImageCache(workdir / "images")
        images = add_tiny_guest(cache)
        hv = Hypervisor.open(
            qemu_uri(workdir / "root"),
            images=cache,
            state_dir=workdir / "state",
            cpu_cap_mode="duty-cycle",
        )
        try:
            hv.create(tiny_guest_spec(GUEST, images, mode="burn"))
            console = hv.console_path(GUEST)
            wait_for(lambda: console_ticks(console), 60, "the guest to boot")
            measured: dict[str, float] = {"100": round(cpu_percent(hv, window_s), 2)}
            for cap in CAPS:
                hv.set_cpu_cap(GUEST, cap)
                cpu_percent(hv, 0.5)  # a few periods under the new cap first
                measured[str(cap)] = round(cpu_percent(hv, window_s), 2)
                logging.info(
                    "qemu, duty cycle at %d %% → %.2f %% of a core", cap, measured[str(cap)]
                )
            return {"virt_type": hv.virt_type, "uri": hv.uri.split("?")[0], "cpu_percent": measured}
        finally:
            for guest in hv.list_guests():
                hv.undefine(guest)
            hv.close()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--window", type=float, default=3.0, help="seconds per cap")
    parser.add_argument("--no-qemu", action="store_true", help="only the fake guest")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    result: dict[str, object] = {"period_ms": PERIOD_S * 1000, "window_s": args.window}
    fake = {}
    for cap in CAPS:
        fake[str(cap)] = fake_guest(cap, args.window)
        logging.info("fake guest, cap %d %%: %s", cap, fake[str(cap)])
    result["fake_guest"] = fake
    ok = all(abs(m["run_percent"] - float(cap)) <= 3 for cap, m in fake.items())  # type: ignore[operator]
    if not args.no_qemu:
        qemu = qemu_guest(args.window)
        result["qemu"] = qemu
        ok = ok and all(
            abs(measured - float(cap)) <= 3
            for cap, measured in qemu["cpu_percent"].items()  # type: ignore[attr-defined]
            if cap != "100"
        )
    result["targets_met"] = ok
    result["cores"] = os.cpu_count()
    result["load_1m"] = round(os.getloadavg()[0], 2)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
