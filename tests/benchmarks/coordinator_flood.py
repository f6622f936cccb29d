"""The coordinator under a flood of half-open connections to its enrollment (or main) port.

A real `donor-coordinator serve` in its own process (shipped limits, its descriptor
limit raised to the hard one as at start, or set with --fd-limit), pinned to core 0
when there are two cores or more. This process (on the other core) opens N connections
to the enrollment port over loopback — connect, then never send a byte — spread over
loopback source addresses (127.0.0.2, …), and keeps them open until the coordinator
drops them. Each run of --runs is PORT:SOURCES: `enroll:100` floods the enrollment port
from 100 addresses; `main:1` floods the main port (donors' and the admin's) from one.
Meanwhile a prober asks the health check (enrollment port) over a new TLS connection
every 100 ms from 127.0.0.1, as a load balancer would. Reported:

- health_ms p50/p99/max and failures during the flood (a check fails after 5 s);
- rss_mib: before the flood (after a warm-up), the peak during it, and after it (once
  every flood connection is gone and 15 s more: the coordinator looks at its heap every
  10 s);
- dropped_s p50/p99/max: seconds from the end of the flood's connecting until the
  coordinator closed (or reset) each connection; still_open counts those it had not
  closed by --drop-timeout;
- splice_us: a health check's round trip on one kept channel through the enrollment
  front minus the same straight to gRPC's loopback listener behind it (median over
  --splice-calls each), what copying through the front adds to one request and reply.

Targets: health p99 ≤ 250 ms with no failure; every connection dropped within 15 s
(the silent deadline, 5 s, plus the TLS handshake deadline, 10 s); RSS after ≤ RSS
before + 24 MiB.

    python tests/benchmarks/coordinator_flood.py [--connections 2000]
        [--runs enroll:1,enroll:100,main:1] [--fd-limit N] [--drop-timeout 150]
        [--splice-calls 2000]

Each run has a fresh coordinator.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import selectors
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import psutil
from grpc_health.v1 import health_pb2, health_pb2_grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from donor_app.coordinator.server import Endpoints
from tests.benchmarks.load_donors import raise_fd_limit
from tests.benchmarks.stats import percentile
from tests.waiting import wait_for

log = logging.getLogger("coordinator_flood")

REPO = Path(__file__).resolve().parents[2]
MIB = 1024 * 1024
TARGETS = {"health_p99_ms": 250.0, "dropped_max_s": 15.0, "rss_growth_mib": 24.0}
PROBE_EVERY_S = 0.1
PROBE_TIMEOUT_S = 5.0
# After the flood: the coordinator's heap check (every 10 s) and a margin.
SETTLE_S = 15.0
# Pinned to a core, the descriptor limit set (soft and hard) if asked, then the CLI.
# argv: core ('' for none), fd limit ('' to leave it), CLI args...
_LAUNCH = (
    "import os, resource, sys\n"
    "if sys.argv[1]:\n"
    "    os.sched_setaffinity(0, {int(sys.argv[1])})\n"
    "if sys.argv[2]:\n"
    "    n = int(sys.argv[2])\n"
    "    resource.setrlimit(resource.RLIMIT_NOFILE, (n, n))\n"
    "from donor_app.coordinator.cli import main\n"
    "sys.exit(main(sys.argv[3:]))\n"
)


@contextmanager
def coordinator(work: Path, core: str, fd_limit: int | None) -> Iterator[tuple[int, Endpoints]]:
    data_dir = work / "data"
    with (work / "coordinator.log").open("wb") as out:
        process = subprocess.Popen(
            [
                sys.executable, "-c", _LAUNCH, core, str(fd_limit or ""),
                "--data-dir", str(data_dir), "--log-level", "WARNING",
                "serve", "--listen", "127.0.0.1:0", "--enroll-listen", "127.0.0.1:0",
                "--metrics-listen", "",
            ],
            stdout=out, stderr=subprocess.STDOUT, cwd=REPO,
        )  # fmt: skip
        try:

            def started() -> Endpoints | None:
                if process.poll() is not None:
                    raise RuntimeError((work / "coordinator.log").read_text())
                try:
                    return Endpoints.load(data_dir)
                except (FileNotFoundError, ValueError):
                    return None

            yield process.pid, wait_for(started, 60, "the coordinator to start")
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)


def rss_mib(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / MIB


def split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


def health_once(address: str, ca: bytes) -> float | None:
    """Seconds for a health check over a new connection; None if it failed."""
    started = time.perf_counter()
    try:
        with grpc.secure_channel(address, grpc.ssl_channel_credentials(ca)) as channel:
            health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=PROBE_TIMEOUT_S
            )
    except grpc.RpcError:
        return None
    return time.perf_counter() - started


class Prober(threading.Thread):
    """Health checks every PROBE_EVERY_S until stopped; also samples the RSS peak."""

    def __init__(self, address: str, ca: bytes, pid: int) -> None:
        super().__init__(name="prober", daemon=True)
        self.address, self.ca, self.pid = address, ca, pid
        self.latencies: list[float] = []
        self.failed = 0
        self.rss_peak = 0.0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            took = health_once(self.address, self.ca)
            if took is None:
                self.failed += 1
            else:
                self.latencies.append(took)
            self.rss_peak = max(self.rss_peak, rss_mib(self.pid))
            self.stop.wait(PROBE_EVERY_S)


def flood(address: str, count: int, sources: int) -> tuple[list[socket.socket], float]:
    """`count` connections spread over `sources` addresses, none sending anything."""
    host, port = split(address)
    socks = []
    for n in range(count):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        source = n % sources
        sock.bind((f"127.0.{source // 250}.{2 + source % 250}", 0))
        sock.setblocking(False)
        sock.connect_ex((host, port))
        socks.append(sock)
    return socks, time.monotonic()


def wait_dropped(socks: list[socket.socket], since: float, timeout: float) -> list[float]:
    """Seconds after `since` at which the other side closed each socket (until timeout)."""
    dropped: list[float] = []
    with selectors.DefaultSelector() as selector:
        for sock in socks:
            selector.register(sock, selectors.EVENT_READ)
        deadline = since + timeout
        while selector.get_map() and time.monotonic() < deadline:
            for key, _ in selector.select(timeout=0.2):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                try:
                    closed = sock.recv(4096) == b""
                except (ConnectionResetError, ConnectionRefusedError):
                    closed = True
                except BlockingIOError:
                    closed = False
                if closed:
                    dropped.append(time.monotonic() - since)
                    selector.unregister(sock)
    return dropped


def backend_port(pid: int, known: set[int]) -> int | None:
    """gRPC's loopback listener behind the front: the coordinator's other TCP listener."""
    ports = {
        c.laddr.port
        for c in psutil.Process(pid).net_connections(kind="tcp")
        if c.status == psutil.CONN_LISTEN
    }
    others = ports - known
    return others.pop() if len(others) == 1 else None


def round_trips_us(address: str, ca: bytes, calls: int) -> float:
    """Median µs of a health check on one kept channel (after a warm-up)."""
    options = [("grpc.ssl_target_name_override", "localhost")]
    with grpc.secure_channel(address, grpc.ssl_channel_credentials(ca), options) as channel:
        check = health_pb2_grpc.HealthStub(channel).Check
        for _ in range(50):
            check(health_pb2.HealthCheckRequest(), timeout=10)
        samples = []
        for _ in range(calls):
            started = time.perf_counter()
            check(health_pb2.HealthCheckRequest(), timeout=10)
            samples.append(time.perf_counter() - started)
    return statistics.median(samples) * 1e6


def one_run(args: argparse.Namespace, port: str, sources: int, core: str) -> dict[str, Any]:
    with (
        tempfile.TemporaryDirectory(prefix="flood-") as tmp,
        coordinator(Path(tmp), core, args.fd_limit) as (pid, endpoints),
    ):
        ca = endpoints.ca_file.read_bytes()
        fd_limit = psutil.Process(pid).rlimit(psutil.RLIMIT_NOFILE)[0]
        for _ in range(20):  # warm-up: first TLS contexts, first allocations
            health_once(endpoints.enroll_address, ca)
        rss_before = rss_mib(pid)
        splice = None
        if args.splice_calls:
            known = {split(endpoints.address)[1], split(endpoints.enroll_address)[1]}
            behind = backend_port(pid, known)
            if behind is not None:
                through = round_trips_us(endpoints.enroll_address, ca, args.splice_calls)
                direct = round_trips_us(f"127.0.0.1:{behind}", ca, args.splice_calls)
                splice = {
                    "through_front_us": round(through, 1),
                    "direct_us": round(direct, 1),
                    "added_us": round(through - direct, 1),
                }
        prober = Prober(endpoints.enroll_address, ca, pid)
        prober.start()
        target = endpoints.enroll_address if port == "enroll" else endpoints.address
        socks, flooded_at = flood(target, args.connections, sources)
        try:
            dropped = wait_dropped(socks, flooded_at, args.drop_timeout)
        finally:
            prober.stop.set()
            prober.join(PROBE_TIMEOUT_S + 5)
            for sock in socks:
                sock.close()
        time.sleep(SETTLE_S)
        rss_after = rss_mib(pid)
    latencies = prober.latencies or [float("nan")]
    still_open = args.connections - len(dropped)
    result: dict[str, Any] = {
        "port": port,
        "sources": sources,
        "connections": args.connections,
        "coordinator_fd_limit": fd_limit,
        "health_ms": {
            "p50": round(statistics.median(latencies) * 1000, 2),
            "p99": round(percentile(latencies, 99) * 1000, 2),
            "max": round(max(latencies) * 1000, 2),
            "checks": len(prober.latencies),
            "failed": prober.failed,
        },
        "rss_mib": {
            "before": round(rss_before, 1),
            "during_peak": round(max(prober.rss_peak, rss_before), 1),
            "after": round(rss_after, 1),
        },
        "dropped_s": {
            "p50": round(statistics.median(dropped), 2) if dropped else None,
            "p99": round(percentile(dropped, 99), 2) if dropped else None,
            "max": round(max(dropped), 2) if dropped else None,
            "still_open": still_open,
        },
        "splice_us": splice,
    }
    result["targets_met"] = (
        prober.failed == 0
        and result["health_ms"]["p99"] <= TARGETS["health_p99_ms"]
        and still_open == 0
        and (max(dropped) if dropped else 0.0) <= TARGETS["dropped_max_s"]
        and rss_after - rss_before <= TARGETS["rss_growth_mib"]
    )
    return result


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--connections", type=int, default=2000)
    parser.add_argument(
        "--runs", default="enroll:1,enroll:100,main:1", help="PORT:SOURCES,… (enroll or main)"
    )
    parser.add_argument("--fd-limit", type=int, default=None)
    parser.add_argument("--drop-timeout", type=float, default=150.0)
    parser.add_argument("--splice-calls", type=int, default=2000)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # The flood's sockets are this process's descriptors too.
    if raise_fd_limit() < args.connections + 256:
        raise SystemExit(f"this process may not open {args.connections} sockets")
    cores = len(os.sched_getaffinity(0))
    core = ""
    if cores >= 2:
        chosen = sorted(os.sched_getaffinity(0))
        core = str(chosen[0])
        os.sched_setaffinity(0, set(chosen[1:]))
    runs = []
    for spec in args.runs.split(","):
        port, _, count = spec.partition(":")
        if port not in ("enroll", "main") or not count.isdigit() or not 0 < int(count) < 60000:
            parser.error(f"--runs: {spec!r} is not enroll:N or main:N")
        sources = int(count)
        log.info("flood: %d connections to the %s port from %d address(es)",
                 args.connections, port, sources)  # fmt: skip
        run = one_run(args, port, sources, core)
        log.info("%s", json.dumps(run))
        runs.append(run)
    result = {
        "benchmark": "coordinator_flood",
        "cores": cores,
        "coordinator_core": core or None,
        "targets": TARGETS,
        "runs": runs,
        "targets_met": all(run["targets_met"] for run in runs),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
