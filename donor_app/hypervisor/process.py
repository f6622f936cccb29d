"""Finding a guest's QEMU process and reading its CPU time and memory.

libvirt's own CPU statistics (`getCPUStats()`) fail on some cgroup setups, and the owner's
load is "host CPU minus the guests' QEMU processes", so the agent needs the processes
themselves. A QEMU process is recognised by the domain UUID on its command line
(`-uuid …`), which works the same for qemu:///system, session and embed.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import psutil


@dataclass(frozen=True, slots=True)
class ProcessRef:
    """A process identity that survives PID reuse: pid plus its start time."""

    pid: int
    create_time: float


def find_qemu_process(uuid: str) -> ProcessRef | None:
    """The QEMU process whose command line carries `-uuid <uuid>`, if one runs."""
    for proc in psutil.process_iter(["cmdline", "create_time"]):
        cmdline = proc.info.get("cmdline") or []
        for flag, value in itertools.pairwise(cmdline):
            if flag == "-uuid" and value == uuid:
                return ProcessRef(proc.pid, float(proc.info["create_time"]))
    return None


def still_running(ref: ProcessRef) -> bool:
    try:
        return psutil.Process(ref.pid).create_time() == ref.create_time
    except psutil.Error:
        return False


@dataclass(frozen=True, slots=True)
class ProcessUsage:
    cpu_seconds: float
    rss_mib: float


def process_usage(ref: ProcessRef) -> ProcessUsage | None:
    """CPU seconds (user + system, all threads) and RSS, or None if it is gone."""
    try:
        proc = psutil.Process(ref.pid)
        with proc.oneshot():
            if proc.create_time() != ref.create_time:
                return None
            times = proc.cpu_times()
            rss = proc.memory_info().rss
    except psutil.Error:
        return None
    return ProcessUsage(times.user + times.system, rss / (1024 * 1024))
