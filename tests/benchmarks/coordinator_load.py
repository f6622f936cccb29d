"""The coordinator under N donors: held streams, updates/s, ack latency, RSS and CPU.

A real `donor-coordinator serve` in its own process pinned to one core (core 0), with
SQLite in a fresh data dir, then the same with a private PostgreSQL (`tests/postgres.py`;
a fresh database per run, the server pinned to the other core). The load generator
(`load_donors.py` worker processes, pinned to core 1) enrolls N donors for real (one
fleet token with N uses; a fresh key, CSR and certificate each; not measured), opens N
Connect streams over mTLS, one channel and connection per donor, and sends a Hello and
then a Report every 5 s from each donor, spread evenly over the interval. After all N
are connected and a warm-up, a window is measured. Per run:

- connected / connected_min: open streams as the coordinator counts them (its metrics
  endpoint, `donor_coordinator_donors_connected`) at the end of / lowest during the
  window;
- updates_per_s: acks the donors received during the window, per second (expected:
  N / interval);
- ack_ms p50/p99 (and ack_ms_max): client side, from just before a report is written to
  its ack's arrival, for every report sent during the window; `unanswered` counts
  reports of the window without an ack 5 s after it;
- rss_mib (peak) and cpu_percent_of_core of the coordinator process (psutil), its CPU
  by thread name (`python`: the interpreter's threads; `event_engine`: gRPC's own), and
  its mean time to handle one report (`donor_coordinator_donor_event_seconds`);
- generator: its CPU, RSS and open streams; postgresql_cpu_percent_of_core; each core's
  busy share and the CPU pressure (PSI) — the machine may be shared, and a generator or
  core near 100 % means the figures are the machine's, not the coordinator's;
- stalls: acks slower than 50 ms clustered by arrival time with the workers that saw
  them (all workers at once: the coordinator), the coordinator's event-loop lag, its
  garbage collections and its `Fleet.flush` batches (from `coordinator_probe.py`,
  which runs the coordinator unchanged), the generator's own GC pauses and loop lag.

Nothing is cached between runs: each run has a new coordinator, data dir, CA, token,
database and donors. Targets: 10,000 donors held, 2,000 updates/s,
p99 ≤ 50 ms, RSS ≤ 1 GiB; `targets_met` is judged on the runs with 10,000 donors.

    python tests/benchmarks/coordinator_load.py [--donors 1000,5000,10000]
        [--stores sqlite,postgresql] [--window 30] [--warmup 10] [--interval 5]
        [--donors-per-worker 5000] [--profile-dir DIR] [--work-dir DIR] [--quick]
        [--coordinator-gc T0,T1,T2] [--coordinator-switch-interval S]

--quick is a smoke run (500 donors, 10 s window, 5 s warm-up). --profile-dir records
the coordinator with py-spy (`pip install py-spy`; not a project dependency) during
each window into DIR/<store>-<N>.txt (collapsed stacks) and adds a summary to the run.
--work-dir keeps the data dirs, coordinator logs and probe notes. The --coordinator-*
options are experiments on the coordinator's interpreter (GC thresholds, the GIL's
switch interval), recorded in the JSON; without them the coordinator runs as shipped.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import queue
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from sqlalchemy.engine import make_url

from donor_app.coordinator.admin_client import AdminClient, AdminCredential
from donor_app.coordinator.server import ENDPOINTS_FILE, Endpoints
from tests.benchmarks.load_donors import raise_fd_limit
from tests.benchmarks.stats import p50_p99
from tests.waiting import wait_for

log = logging.getLogger("coordinator_load")

REPO = Path(__file__).resolve().parents[2]
TARGETS = {"donors": 10_000, "updates_per_s": 2_000, "p99_ms": 50.0, "rss_mib": 1024.0}
MIB = 1024 * 1024
# Window edges: an ack counted by arrival time may fall just outside; allow 1 %.
RATE_TOLERANCE = 0.99
# Runs a program pinned to one core with the fd limit raised, and terminated should this
# process die (PR_SET_PDEATHSIG survives exec). No preexec_fn: this process has threads.
# argv: core ('' for none), program, args...
_PINNED = (
    "import ctypes, os, resource, signal, sys\n"
    "ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)\n"
    "if sys.argv[1]:\n"
    "    os.sched_setaffinity(0, {int(sys.argv[1])})\n"
    "soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n"
    "resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))\n"
    "os.execv(sys.argv[2], sys.argv[2:])\n"
)


@dataclass
class ProbeNotes:
    """What `coordinator_probe.py` noted during the window (times: seconds into it)."""

    gc: list[list[float]]  # [at, generation, ms]
    lags: list[list[float]]  # [at, ms], the loop ≥ 5 ms late
    lag_samples: int
    flushes: list[list[float]]  # [at, ms]

    @classmethod
    def read(cls, path: Path, t0: float, t1: float) -> ProbeNotes:
        notes = cls([], [], 0, [])
        try:
            lines = path.read_text().splitlines()
        except OSError:
            return notes
        for line in lines:
            kind, *fields = line.split()
            at = float(fields[0])
            if kind == "flush" and at < t1 and at + float(fields[1]) / 1000 > t0:
                # Flushes are noted when they end: keep any that overlaps the window.
                notes.flushes.append([round(at - t0, 2), float(fields[1])])
            if not t0 <= at < t1:
                continue
            if kind == "gc":
                notes.gc.append([round(at - t0, 2), int(fields[1]), float(fields[2])])
            elif kind == "lag":
                notes.lags.append([round(at - t0, 2), float(fields[1])])
            elif kind == "ticks":
                notes.lag_samples += int(fields[1])
        return notes

    def loop_lag(self, seconds: float) -> dict[str, Any]:
        """How late the coordinator's loop woke from a 10 ms sleep (a busy or blocked
        loop delays every ack by as much). `stall_wait_p99_ms` is the coordinator's own
        share of the ack p99, whatever the generator adds: see stall_wait_percentile."""
        samples = max(1, self.lag_samples)
        over_50 = [lag for lag in self.lags if lag[1] > 50]

        def during_flush(at: float, ms: float) -> bool:
            # The loop was late over [at - ms, at]; a flush ran over [start, start + its ms].
            return any(
                start < at and at - ms / 1000 < start + f_ms / 1000 for start, f_ms in self.flushes
            )

        return {
            "samples": self.lag_samples,
            "stall_wait_p99_ms": stall_wait_percentile([lag[1] for lag in self.lags], seconds, 99),
            "stalled_over_50ms_percent_of_time": round(
                100 * sum(ms for _, ms in over_50) / 1000 / seconds, 2
            ),
            "over_5ms_percent": round(100 * len(self.lags) / samples, 2),
            "over_50ms_percent": round(100 * len(over_50) / samples, 2),
            "over_50ms_during_flush": sum(during_flush(at, ms) for at, ms in over_50),
            "over_50ms_during_gc": sum(
                any(
                    g_at - g_ms / 1000 - 0.01 < at and at - ms / 1000 < g_at + 0.01
                    for g_at, _, g_ms in self.gc
                )
                for at, ms in over_50
            ),
            "max_ms": max((lag[1] for lag in self.lags), default=0.0),
            "worst_at_s": sorted(self.lags, key=lambda lag: -lag[1])[:5],
        }

    def flush_summary(self, seconds: float) -> dict[str, Any]:
        """The fleet's batched store writes (`Fleet.flush`, meant to run once a second)
        that overlapped the window: how many, how long (wall: its loop side and its
        worker thread together), and the share of the window one was running."""
        ms = [f[1] for f in self.flushes]
        busy = sum(min(seconds, at + f_ms / 1000) - max(0.0, at) for at, f_ms in self.flushes)
        return {
            "count": len(ms),
            "mean_ms": round(sum(ms) / len(ms), 1) if ms else None,
            "max_ms": max(ms, default=None),
            "busy_percent": round(100 * busy / seconds, 1),
        }


def stall_wait_percentile(stalls_ms: list[float], seconds: float, pct: float) -> float:
    """The pct-th percentile of how long a message arriving at a uniformly random moment
    waits for the event loop to come back from a stall (stalls ≥ 5 ms; shorter waits
    count as 0). A stall of L ms makes arrivals wait between 0 and L, so
    P(wait > d) = Σ max(0, L − d) / window; solved for P = 1 − pct/100."""
    budget = (1 - pct / 100) * seconds * 1000
    if sum(stalls_ms) <= budget:
        return 0.0
    low, high = 0.0, max(stalls_ms)
    for _ in range(50):
        middle = (low + high) / 2
        if sum(max(0.0, stall - middle) for stall in stalls_ms) > budget:
            low = middle
        else:
            high = middle
    return round(high, 1)


def pinned(core: int | None, argv: list[str]) -> list[str]:
    program = shutil.which(argv[0]) or argv[0]
    return [sys.executable, "-c", _PINNED, "" if core is None else str(core), program, *argv[1:]]


# --- the coordinator --------------------------------------------------------------------


@dataclass
class Coordinator:
    process: subprocess.Popen[bytes]
    endpoints: Endpoints
    log_file: Path
    probe_file: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def admin(self) -> AdminClient:
        e = self.endpoints
        credential = AdminCredential.from_files(e.ca_file, e.admin_cert_file, e.admin_key_file)
        return AdminClient(e.address, credential)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


@contextmanager
def coordinator_process(
    data_dir: Path,
    store_url: str | None,
    interval_s: float,
    core: int | None,
    experiments: tuple[str, ...] = (),
) -> Iterator[Coordinator]:
    """`donor-coordinator serve` in a process of its own, pinned to `core`, so that its
    CPU and RSS are measured apart from the load generator (the tests' in-process one is
    `tests.coordinator_helpers.running_coordinator`)."""
    log_file = data_dir.parent / f"{data_dir.name}.log"
    probe_file = data_dir.parent / f"{data_dir.name}.probe"
    argv = [
        sys.executable,
        "-m",
        "tests.benchmarks.coordinator_probe",
        str(probe_file),
        *experiments,
        "--",
        "--data-dir",
        str(data_dir),
        "--log-level",
        "INFO",
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--enroll-listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "127.0.0.1:0",
        "--report-interval",
        f"{max(1, round(interval_s))}s",
    ]
    if store_url:
        argv += ["--store-url", store_url]
    with log_file.open("wb") as log_out:
        process = subprocess.Popen(
            pinned(core, argv), cwd=REPO, stdout=log_out, stderr=subprocess.STDOUT
        )
    try:
        wait_for(
            lambda: process.poll() is not None or (data_dir / ENDPOINTS_FILE).exists(),
            120,
            "the coordinator to serve",
        )
        if process.poll() is not None:
            raise RuntimeError(f"the coordinator exited:\n{log_file.read_text(errors='replace')}")
        endpoints = Endpoints.load(data_dir)
        if endpoints.metrics_port is None:
            raise RuntimeError("the coordinator serves no metrics endpoint")
        yield Coordinator(process, endpoints, log_file, probe_file)
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)


def scrape(port: int) -> dict[str, float]:
    """The coordinator's metrics this benchmark reads (connected; report handling)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    wanted = {
        "donor_coordinator_donors_connected": "connected",
        'donor_coordinator_donor_event_seconds_sum{kind="Report"}': "report_s",
        'donor_coordinator_donor_event_seconds_count{kind="Report"}': "reports",
    }
    found: dict[str, float] = {}
    for line in text.splitlines():
        name, _, value = line.rpartition(" ")
        if name in wanted:
            found[wanted[name]] = float(value)
    return found


# --- the load generator -----------------------------------------------------------------


class Worker:
    """One `load_donors.py` process, driven over its stdin/stdout (JSON lines)."""

    def __init__(self, argv: list[str], core: int | None) -> None:
        self.process = subprocess.Popen(
            pinned(core, argv),
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self._events: queue.Queue[dict[str, Any] | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            try:
                self._events.put(json.loads(line))
            except ValueError:
                log.warning("worker %d: %s", self.process.pid, line.rstrip())
        self._events.put(None)

    def send(self, command: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()

    def expect(self, event: str, timeout_s: float) -> dict[str, Any]:
        item = self._events.get(timeout=timeout_s)
        if item is None:
            raise RuntimeError(f"worker {self.process.pid} exited (rc {self.process.wait()})")
        if item.get("event") != event:
            raise RuntimeError(f"worker {self.process.pid}: expected {event}, got {item}")
        return item

    def stop(self) -> None:
        if self.process.poll() is None:
            try:
                self.send("quit")
                self.process.wait(60)
            except (OSError, subprocess.TimeoutExpired):
                self.process.kill()
                self.process.wait(10)


@contextmanager
def running_workers(
    coordinator: Coordinator, token: str, donors: int, per_worker: int, args: argparse.Namespace
) -> Iterator[list[Worker]]:
    count = max(1, math.ceil(donors / per_worker))
    workers: list[Worker] = []
    try:
        for i in range(count):
            share = donors // count + (1 if i < donors % count else 0)
            argv = [
                sys.executable,
                "-m",
                "tests.benchmarks.load_donors",
                "--address",
                coordinator.endpoints.address,
                "--enroll-address",
                coordinator.endpoints.enroll_address,
                "--ca-file",
                str(coordinator.endpoints.ca_file),
                "--token",
                token,
                "--count",
                str(share),
                "--first-index",
                str(i),
                "--stride",
                str(count),
                "--total",
                str(donors),
                "--interval",
                str(args.interval),
            ]
            workers.append(Worker(argv, args.generator_core))
        yield workers
    finally:
        for worker in workers:
            worker.stop()


# --- measuring --------------------------------------------------------------------------


def cpu_seconds(processes: list[psutil.Process]) -> float:
    total = 0.0
    for process in processes:
        try:
            times = process.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def rss_mib(processes: list[psutil.Process]) -> float:
    total = 0
    for process in processes:
        try:
            total += process.memory_info().rss
        except psutil.NoSuchProcess:
            continue
    return total / MIB


def thread_cpu(process: psutil.Process) -> dict[int, tuple[str, float]]:
    """Each thread's name (as the kernel knows it) and CPU seconds so far."""
    threads: dict[int, tuple[str, float]] = {}
    try:
        for thread in process.threads():
            try:
                name = Path(f"/proc/{process.pid}/task/{thread.id}/comm").read_text().strip()
            except OSError:
                name = "?"
            threads[thread.id] = (name, thread.user_time + thread.system_time)
    except psutil.NoSuchProcess:
        pass
    return threads


def thread_share(
    before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]], seconds: float
) -> dict[str, float]:
    """% of one core per thread name over the window (threads of one name summed)."""
    used: Counter[str] = Counter()
    for tid, (name, cpu) in after.items():
        used[name] += cpu - before.get(tid, (name, 0.0))[1]
    return {name: round(100 * cpu / seconds, 1) for name, cpu in used.most_common() if cpu > 0}


def core_busy(before: list[Any], after: list[Any]) -> dict[str, float]:
    busy = {}
    for core, (a, b) in enumerate(zip(before, after, strict=True)):
        total = sum(b) - sum(a)
        idle = (b.idle - a.idle) + (getattr(b, "iowait", 0.0) - getattr(a, "iowait", 0.0))
        busy[str(core)] = round(100 * (1 - idle / total), 1) if total > 0 else 0.0
    return busy


def other_load(
    busy: dict[str, float], args: argparse.Namespace, coordinator: float, generator_side: float
) -> dict[str, float] | None:
    if args.coordinator_core is None or args.generator_core is None:
        return None
    return {
        "coordinator_core": round(max(0.0, busy[str(args.coordinator_core)] - coordinator), 1),
        "generator_core": round(max(0.0, busy[str(args.generator_core)] - generator_side), 1),
    }


def cpu_pressure_us() -> float | None:
    """Total µs some runnable task waited for a CPU (Linux PSI), or None."""
    try:
        for line in Path("/proc/pressure/cpu").read_text().splitlines():
            if line.startswith("some "):
                return float(line.rsplit("total=", 1)[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def postgres_processes(url: str) -> list[psutil.Process]:
    """The postmaster serving `url`'s port and its children (backends and helpers)."""
    port = make_url(url).port
    for process in psutil.process_iter(["name", "cmdline"]):
        cmdline = process.info.get("cmdline") or []
        if process.info.get("name") == "postgres" and any(
            f"port={port}" in part for part in cmdline
        ):
            try:
                return [process, *process.children(recursive=True)]
            except psutil.NoSuchProcess:
                return []
    return []


def pin(processes: list[psutil.Process], core: int | None) -> None:
    if core is None:
        return
    for process in processes:
        for thread in _threads(process):
            try:
                os.sched_setaffinity(thread, {core})
            except OSError:
                continue


def _threads(process: psutil.Process) -> list[int]:
    try:
        return [t.id for t in process.threads()]
    except psutil.NoSuchProcess:
        return []


@contextmanager
def profiling(pid: int, seconds: float, out: Path | None, core: int | None) -> Iterator[None]:
    """py-spy record of `pid` for `seconds` into `out` (collapsed stacks), if asked."""
    if out is None:
        yield
        return
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    argv = [
        py_spy,
        "record",
        "--pid",
        str(pid),
        "--duration",
        str(max(1, round(seconds))),
        "--rate",
        "100",
        "--nonblocking",
        "--format",
        "raw",
        "--output",
        str(out),
    ]
    process = subprocess.Popen(
        pinned(core, argv), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        yield
    finally:
        try:
            process.wait(seconds + 60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def summarize_profile(path: Path, top: int = 12) -> dict[str, Any]:
    """Collapsed stacks → the busiest functions (own time) and packages (inclusive)."""
    own: Counter[str] = Counter()
    packages: Counter[str] = Counter()
    samples = 0
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError as error:
        return {"error": str(error)}
    for line in lines:
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        samples += count
        frames = [_function(frame) for frame in stack.split(";")]
        own[frames[-1]] += count
        for package in {_package(frame) for frame in stack.split(";")}:
            packages[package] += count

    def share(counter: Counter[str]) -> list[list[Any]]:
        return [[name, round(100 * n / samples, 1)] for name, n in counter.most_common(top)]

    return {
        "file": str(path),
        "samples": samples,
        "own_percent": share(own) if samples else [],
        "inclusive_percent_by_package": share(packages) if samples else [],
    }


def _function(frame: str) -> str:
    """'flush (donor_app/coordinator/fleet.py:640)' → 'flush (donor_app/coordinator/fleet.py)'."""
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    for marker in ("site-packages/", "lib/python3.11/", str(REPO) + "/"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{name} ({path})"


def _package(frame: str) -> str:
    path = _function(frame).partition(" (")[2].rstrip(")")
    parts = path.split("/")
    if parts[0] in ("donor_app", "grpc", "sqlalchemy", "google", "prometheus_client"):
        return "/".join(parts[:3]) if parts[0] == "donor_app" else parts[0]
    return parts[0].removesuffix(".py") or "?"


def ack_percentiles(latencies: list[float], unanswered: int) -> dict[str, float | None]:
    """p50/p99 over every report of the window, the unanswered ones as the slowest;
    None where the percentile falls on an unanswered report (the coordinator is behind
    by more than the grace period, so there is no figure to give)."""
    if not latencies and not unanswered:
        return {"p50": None, "p99": None}
    if not unanswered:
        return p50_p99(latencies)
    ordered = sorted(latencies)
    total = len(ordered) + unanswered
    result: dict[str, float | None] = {}
    for name, pct in (("p50", 50.0), ("p99", 99.0)):
        rank = min(total - 1, max(0, round(pct / 100 * total + 0.5) - 1))  # as stats.py
        result[name] = round(ordered[rank], 2) if rank < len(ordered) else None
    return result


def stall_clusters(windows: list[dict[str, Any]], gap_s: float = 0.25) -> list[dict[str, Any]]:
    """Slow acks (arrival time in the window, ms) grouped where arrivals are < gap_s
    apart: a stall seen by every worker at once is the coordinator's (or the machine's);
    one seen by a single worker is that worker's."""
    slow = sorted((at, ms, i) for i, w in enumerate(windows) for at, ms in w["slow"])
    clusters: list[dict[str, Any]] = []
    for at, ms, worker in slow:
        if clusters and at - clusters[-1]["last"] < gap_s:
            c = clusters[-1]
            c["last"], c["n"], c["max_ms"] = at, c["n"] + 1, max(c["max_ms"], ms)
            c["workers"].add(worker)
        else:
            clusters.append(
                {"at_s": round(at, 2), "last": at, "n": 1, "max_ms": ms, "workers": {worker}}
            )
    clusters.sort(key=lambda c: -c["n"])
    return [
        {"at_s": c["at_s"], "n": c["n"], "max_ms": c["max_ms"], "workers": sorted(c["workers"])}
        for c in clusters[:8]
    ]


def gc_summary(pauses: list[list[float]]) -> dict[str, Any]:
    """Pauses (≥ 5 ms, or any of the oldest generation) by generation: count, total
    and longest ms; the first few oldest-generation ones with their times."""
    summary: dict[str, Any] = {}
    for generation in sorted({int(p[1]) for p in pauses}):
        ms = [p[2] for p in pauses if p[1] == generation]
        summary[f"gen{generation}"] = {
            "count": len(ms),
            "total_ms": round(sum(ms), 1),
            "max_ms": max(ms),
        }
    summary["oldest_generation_at_s"] = [[p[0], p[2]] for p in pauses if p[1] == 2][:10]
    return summary


# --- one run ----------------------------------------------------------------------------


def run_once(
    store: str, donors: int, store_url: str | None, base: Path, args: argparse.Namespace
) -> dict[str, Any]:
    data_dir = Path(tempfile.mkdtemp(prefix=f"coord-{store}-{donors}-", dir=base))
    result: dict[str, Any] = {"store": store, "donors": donors}
    log.info("%s, %d donors: starting the coordinator in %s", store, donors, data_dir)
    with ExitStack() as stack:
        coordinator = stack.enter_context(
            coordinator_process(
                data_dir, store_url, args.interval, args.coordinator_core, experiments(args)
            )
        )
        coordinator_proc = psutil.Process(coordinator.pid)
        metrics_port = coordinator.endpoints.metrics_port
        assert metrics_port is not None
        with coordinator.admin() as admin:
            token = admin.create_token(ttl_s=6 * 3600, uses=donors, note="load benchmark").token
        workers = stack.enter_context(
            running_workers(coordinator, token, donors, args.donors_per_worker, args)
        )
        worker_procs = [psutil.Process(w.process.pid) for w in workers]

        started = time.monotonic()
        enrolled = [w.expect("enrolled", args.setup_timeout) for w in workers]
        result["enroll_s"] = round(time.monotonic() - started, 1)
        enroll_failed = sum(e["failed"] for e in enrolled)
        log.info("enrolled %d in %.1f s", donors - enroll_failed, result["enroll_s"])

        started = time.monotonic()
        for worker in workers:
            worker.send("connect")
        connected = [w.expect("connected", args.setup_timeout) for w in workers]
        result["connect_s"] = round(time.monotonic() - started, 1)
        setup_errors: Counter[str] = Counter()
        for item in (*enrolled, *connected):
            setup_errors.update(item["errors"])
        failed = enroll_failed + sum(c["failed"] for c in connected)
        # Attempts that failed (the coordinator too busy to finish the handshake and
        # answer the Hello within 120 s) and were retried, as an agent would.
        result["connect_retries"] = sum(c["retries"] for c in connected)
        log.info(
            "connected %d in %.1f s (%d retries)",
            donors - failed,
            result["connect_s"],
            result["connect_retries"],
        )

        pg_procs: list[psutil.Process] = []
        if store_url and store == "postgresql":
            pg_procs = postgres_processes(store_url)
            pin(pg_procs, args.generator_core)  # backends opened meanwhile

        time.sleep(args.warmup)
        t0 = time.monotonic() + 1.0
        t1 = t0 + args.window
        for worker in workers:
            worker.send(f"window {t0:.6f} {t1:.6f}")
        profile_file = (
            args.profile_dir / f"{store}-{donors}.txt" if args.profile_dir is not None else None
        )
        time.sleep(max(0.0, t0 - time.monotonic()))
        with profiling(coordinator.pid, args.window, profile_file, args.generator_core):
            cores_before = psutil.cpu_times(percpu=True)
            pressure_before = cpu_pressure_us()
            coord_cpu_before = cpu_seconds([coordinator_proc])
            threads_before = thread_cpu(coordinator_proc)
            gen_cpu_before = cpu_seconds(worker_procs)
            self_cpu_before = cpu_seconds([psutil.Process()])
            pg_cpu_before = cpu_seconds(pg_procs)
            metrics_before = scrape(metrics_port)
            rss_peak = coordinator_proc.memory_info().rss / MIB
            gen_rss_peak = rss_mib(worker_procs)
            connected_seen = [metrics_before.get("connected", 0.0)]
            while (left := t1 - time.monotonic()) > 0:
                time.sleep(min(1.0, left))
                rss_peak = max(rss_peak, coordinator_proc.memory_info().rss / MIB)
                gen_rss_peak = max(gen_rss_peak, rss_mib(worker_procs))
                if time.monotonic() < t1 - 0.5:
                    connected_seen.append(scrape(metrics_port).get("connected", 0.0))
            seconds = args.window + (time.monotonic() - t1)
            coord_cpu = cpu_seconds([coordinator_proc]) - coord_cpu_before
            threads = thread_share(threads_before, thread_cpu(coordinator_proc), seconds)
            gen_cpu = cpu_seconds(worker_procs) - gen_cpu_before
            self_cpu = cpu_seconds([psutil.Process()]) - self_cpu_before
            pg_cpu = cpu_seconds(pg_procs) - pg_cpu_before
            cores_after = psutil.cpu_times(percpu=True)
            pressure_after = cpu_pressure_us()
            metrics_after = scrape(metrics_port)
        windows = [w.expect("window", args.window + 120) for w in workers]
        probe = ProbeNotes.read(coordinator.probe_file, t0, t1)
        if coordinator.process.poll() is not None:
            raise RuntimeError(f"the coordinator died:\n{coordinator.log_tail()}")

    latencies = [x for w in windows for x in w["latencies_ms"]]
    unanswered = sum(w["unanswered"] for w in windows)
    acks = sum(w["acks"] for w in windows)
    stream_errors: Counter[str] = Counter()
    for w in windows:
        stream_errors.update(w["errors"])
    reports = metrics_after.get("reports", 0.0) - metrics_before.get("reports", 0.0)
    report_s = metrics_after.get("report_s", 0.0) - metrics_before.get("report_s", 0.0)
    expected = donors / args.interval
    result |= {
        "connected": int(metrics_after.get("connected", 0.0)),
        "connected_min": int(min(connected_seen)),
        "updates_per_s": round(acks / args.window, 1),
        "expected_updates_per_s": round(expected, 1),
        "ack_ms": ack_percentiles(latencies, unanswered),
        "ack_ms_max": round(max(latencies), 2) if latencies and not unanswered else None,
        "reports_sent": sum(w["sent"] for w in windows),
        # Reports of the window still without an ack 5 s after it: they count as slower
        # than any answered one, and a percentile that falls on them is null.
        "unanswered": unanswered,
        "rss_mib": round(rss_peak, 1),
        "cpu_percent_of_core": round(100 * coord_cpu / seconds, 1),
        "coordinator_threads_cpu_percent": threads,
        "server_report_handling_us": round(1e6 * report_s / reports, 1) if reports else None,
        "generator": {
            "workers": len(workers),
            "cpu_percent_of_core": round(100 * gen_cpu / seconds, 1),
            "rss_mib": round(gen_rss_peak, 1),
            "streams_open_at_end": sum(w["open_streams"] for w in windows),
        },
        "core_busy_percent": core_busy(cores_before, cores_after),
        # What else ran on the two cores (busy minus this benchmark's own processes), %
        # of a core: the machine may be shared.
        "other_load_percent": other_load(
            core_busy(cores_before, cores_after),
            args,
            coordinator=100 * coord_cpu / seconds,
            generator_side=100 * (gen_cpu + pg_cpu + self_cpu) / seconds,
        ),
        # Share of the window in which some runnable task waited for a CPU (PSI; our
        # own workers sharing core 1 count too).
        "cpu_pressure_percent": round((pressure_after - pressure_before) / 1e4 / seconds, 1)
        if pressure_before is not None and pressure_after is not None
        else None,
        "stalls": {
            "acks_over_50ms": sum(len(w["slow"]) for w in windows),
            "clusters": stall_clusters(windows),
            "coordinator_loop_lag": probe.loop_lag(args.window),
            "coordinator_gc": gc_summary(probe.gc),
            "coordinator_flush": probe.flush_summary(args.window),
            "generator_gc": [gc_summary(w["gc_pauses"]) for w in windows],
            "generator_loop_lag": [w["loop_lag"] for w in windows],
        },
        "setup_failures": failed,
        # Failed enrollments, failed connection attempts (retried), streams lost.
        "errors": dict(setup_errors + stream_errors),
    }
    if pg_procs:
        result["postgresql_cpu_percent_of_core"] = round(100 * pg_cpu / seconds, 1)
    if profile_file is not None:
        result["profile"] = summarize_profile(profile_file)
    p99 = result["ack_ms"]["p99"]
    result["targets_met"] = {
        "held": result["connected"] == donors and result["connected_min"] == donors,
        "updates_per_s": result["updates_per_s"] >= RATE_TOLERANCE * expected,
        "p99": p99 is not None and p99 <= TARGETS["p99_ms"],
        "rss": result["rss_mib"] <= TARGETS["rss_mib"],
    }
    log.info("%s", json.dumps({k: v for k, v in result.items() if k != "profile"}))
    return result


def experiments(args: argparse.Namespace) -> tuple[str, ...]:
    """The probe's options for what --coordinator-* asked (nothing by default)."""
    chosen: tuple[str, ...] = ()
    if args.coordinator_gc:
        chosen += ("--gc", args.coordinator_gc)
    if args.coordinator_switch_interval is not None:
        chosen += ("--switch-interval", str(args.coordinator_switch_interval))
    return chosen


def run_or_fail(
    store: str, donors: int, store_url: str | None, base: Path, args: argparse.Namespace
) -> dict[str, Any]:
    """One run; a failure is reported in its place (the other runs still count)."""
    try:
        return run_once(store, donors, store_url, base, args)
    except Exception as error:
        log.exception("%s, %d donors: the run failed", store, donors)
        return {"store": store, "donors": donors, "failed": f"{type(error).__name__}: {error}"}


def run_store(store: str, args: argparse.Namespace, base: Path) -> list[dict[str, Any]]:
    if store == "sqlite":
        return [run_or_fail(store, n, None, base, args) for n in args.donors]
    from tests.postgres import fresh_database, running_postgres

    runs = []
    with running_postgres(base) as server_url:
        for n in args.donors:
            with fresh_database(server_url, prefix="load") as url:
                runs.append(run_or_fail(store, n, url, base, args))
    return runs


def _int_list(text: str) -> list[int]:
    return [int(part.replace("_", "")) for part in text.split(",") if part.strip()]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--donors", type=_int_list, default=None, help="default 1000,5000,10000")
    parser.add_argument("--stores", default="sqlite,postgresql")
    parser.add_argument("--window", type=float, default=None, help="seconds (default 30)")
    parser.add_argument("--warmup", type=float, default=None, help="seconds (default 10)")
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between reports")
    parser.add_argument("--donors-per-worker", type=int, default=5000)
    parser.add_argument("--coordinator-core", type=int, default=0)
    parser.add_argument("--generator-core", type=int, default=1)
    parser.add_argument("--setup-timeout", type=float, default=900.0, help="enroll/connect")
    parser.add_argument("--profile-dir", type=Path, default=None)
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=None,
        help="keep the coordinators' data dirs, logs and probe notes here (default: a"
        " temporary directory, removed at the end)",
    )
    parser.add_argument(
        "--coordinator-gc",
        default="",
        metavar="T0,T1,T2",
        help="an experiment: gc.set_threshold(T0, T1, T2) in the coordinator before it starts",
    )
    parser.add_argument(
        "--coordinator-switch-interval",
        type=float,
        default=None,
        metavar="S",
        help="an experiment: sys.setswitchinterval(S) in the coordinator (CPython: 0.005)",
    )
    parser.add_argument("--quick", action="store_true", help="500 donors, 10 s window")
    args = parser.parse_args()
    args.donors = args.donors or ([500] if args.quick else [1000, 5000, 10000])
    args.window = args.window or (10.0 if args.quick else 30.0)
    args.warmup = args.warmup or (5.0 if args.quick else 10.0)
    stores = [s.strip() for s in args.stores.split(",") if s.strip()]
    if unknown := set(stores) - {"sqlite", "postgresql"}:
        parser.error(f"--stores: unknown {sorted(unknown)}")
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)

    available = os.sched_getaffinity(0)
    if {args.coordinator_core, args.generator_core} - available or (
        args.coordinator_core == args.generator_core
    ):
        log.warning(
            "cores %s and %s are not both available (%s): not pinning",
            args.coordinator_core,
            args.generator_core,
            sorted(available),
        )
        args.coordinator_core = args.generator_core = None
    else:
        os.sched_setaffinity(0, {args.generator_core})  # this process samples, mostly idle
    raise_fd_limit()

    def stop(signum: int, _frame: object) -> None:
        # Who else was running (the sender may still be), then unwind through every
        # `finally`: the coordinator, workers and PostgreSQL stop.
        ps = subprocess.run(
            ["ps", "-eo", "pid,ppid,etime,args"], capture_output=True, text=True, check=False
        )
        log.error("processes at the signal:\n%s", ps.stdout)
        raise SystemExit(f"coordinator_load: stopped by signal {signal.Signals(signum).name}")

    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, stop)
    if args.profile_dir is not None:
        args.profile_dir.mkdir(parents=True, exist_ok=True)

    runs: list[dict[str, Any]] = []
    with ExitStack() as stack:
        if args.work_dir is not None:
            args.work_dir.mkdir(parents=True, exist_ok=True)
            work = args.work_dir
        else:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="coord-load-")))
        for store in stores:
            runs += run_store(store, args, work)
    at_target = [r for r in runs if r["donors"] >= TARGETS["donors"]]
    result = {
        "runs": runs,
        "cores": os.cpu_count(),
        "coordinator_core": args.coordinator_core,
        "generator_core": args.generator_core,
        "window_s": args.window,
        "warmup_s": args.warmup,
        "report_interval_s": args.interval,
        "fd_limit": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
        # Experiments on the coordinator's interpreter (none: as shipped).
        "coordinator_experiments": " ".join(experiments(args)) or None,
        "targets": TARGETS,
        # The targets are for 10,000 donors: None when no run had that many.
        "targets_met": all(all(r.get("targets_met", {"ran": False}).values()) for r in at_target)
        if at_target
        else None,
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
