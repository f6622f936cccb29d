"""Benchmark of the hypervisor operations the agent's critical path depends on.

A real tiny guest burning CPU (TCG or KVM, as probed), 50 repetitions each:
suspend, resume and CPU-cap change latency through `Hypervisor`; for caps 10/25/50/100 %
the QEMU process's measured CPU share over 3 s; save and restore; the balloon to half.
Targets: suspend, resume and cap change p99 ≤ 10 ms; CPU within ±3 points of
each cap. The last line printed is one JSON object.

    python tests/benchmarks/hypervisor_ops.py
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from donor_app.hypervisor.host import Hypervisor
from donor_app.hypervisor.images import ImageCache
from tests.benchmarks.stats import p50_p99
from tests.guests import (
    add_tiny_guest,
    console_ticks,
    qemu_uri,
    shared_tmp_dir,
    tiny_guest_spec,
)
from tests.waiting import wait_for

REPEATS = 50
GUEST = "bench"


def summary_ms(samples: list[float]) -> dict[str, float]:
    return p50_p99(samples, scale=1000, digits=3)


def timed(call: Callable[[], None]) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def cpu_share(hv: Hypervisor, seconds: float) -> float:
    """The QEMU process's CPU use over `seconds`, in percent of one core."""
    before, start = hv.usage(GUEST).cpu_seconds, time.monotonic()
    time.sleep(seconds)  # the measurement window itself
    used = hv.usage(GUEST).cpu_seconds - before
    return 100 * used / (time.monotonic() - start)


def run(hv: Hypervisor, workdir: Path, images: tuple[str, str]) -> dict[str, object]:
    hv.create(tiny_guest_spec(GUEST, images, mode="burn"))
    console = hv.console_path(GUEST)
    wait_for(lambda: console_ticks(console), 60, "the guest to boot")

    suspend, resume = [], []
    for _ in range(REPEATS):
        suspend.append(timed(lambda: hv.suspend(GUEST)))
        resume.append(timed(lambda: hv.resume(GUEST)))

    cap_change = []
    for i in range(REPEATS):
        cap_change.append(timed(lambda i=i: hv.set_cpu_cap(GUEST, 30 if i % 2 else 70)))

    accuracy = {}
    for cap in (10, 25, 50, 100):
        hv.set_cpu_cap(GUEST, cap)
        cpu_share(hv, 0.5)  # let the new quota take hold (~200 ms)
        accuracy[str(cap)] = round(cpu_share(hv, 3.0), 2)
        logging.info("cap %d %% → measured %.2f %%", cap, accuracy[str(cap)])

    save_file = workdir / "bench.save"
    save_s = timed(lambda: hv.save(GUEST, save_file))
    restore_s = timed(lambda: hv.restore(GUEST, save_file))

    half = tiny_guest_spec(GUEST, images).memory_mib // 2
    start = time.perf_counter()
    hv.set_memory_cap(GUEST, half)
    wait_for(lambda: hv.usage(GUEST).memory_mib <= half, 60, "the balloon", interval=0.005)
    balloon_s = time.perf_counter() - start
    hv.undefine(GUEST)

    return {
        "suspend_ms": summary_ms(suspend),
        "resume_ms": summary_ms(resume),
        "cap_change_ms": summary_ms(cap_change),
        "cap_accuracy": accuracy,
        "save_s": round(save_s, 3),
        "restore_s": round(restore_s, 3),
        "balloon_half_s": round(balloon_s, 3),
        "virt_type": hv.virt_type,
        "uri": hv.uri.split("?")[0],
        "cores": os.cpu_count(),
    }


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    workdir = shared_tmp_dir(Path(tempfile.mkdtemp(prefix="dvb-", dir="/tmp")))
    try:
        cache = ImageCache(workdir / "images")
        images = add_tiny_guest(cache)
        hv = Hypervisor.open(qemu_uri(workdir / "root"), images=cache, state_dir=workdir / "s")
        try:
            result = run(hv, workdir, images)
        finally:
            for guest in hv.list_guests():
                hv.undefine(guest)
            hv.close()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    ok = all(
        result[key]["p99"] <= 10  # type: ignore[index]
        for key in ("suspend_ms", "resume_ms", "cap_change_ms")
    ) and all(
        abs(measured - float(cap)) <= 3
        for cap, measured in result["cap_accuracy"].items()  # type: ignore[attr-defined]
    )
    result["targets_met"] = ok
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
