"""Whether open status streams slow the owner's return: ReportActivity's round trip over
the agent's local API with no WatchStatus stream open, then with 50, in the same run.

The agent runs in this process (tests/agent_in_process.py: engine, history and local API
on a Unix socket, libvirt's test:/// driver). The 50 streams are followed by a child
process, one channel each (as 50 trays would), so their reading does not compete with
the measured calls for this process's GIL; the child says how many snapshots each
stream got while the calls were measured, so a starved stream shows. While measuring,
the agent's status changes 10 times a second (a guest move recorded; `--changes-per-s`),
far more often than a real agent's, so that the calls meet stream traffic. `--calls`
ReportActivity calls per phase, spaced 5–15 ms apart. Target: with 50 streams open,
every call answered, p99 ≤ 10 ms (a fifth of the owner-return budget, input → guest
paused p99 ≤ 50 ms).

    python tests/benchmarks/local_api_streams.py [--calls 500] [--streams 50]
        [--changes-per-s 10]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import grpc

from donor_app.agent.local_client import AgentClient, AgentUnavailable
from donor_app.domain.status import GuestMove
from donor_app.proto.v1 import agent_pb2 as pb
from donor_app.proto.v1 import agent_pb2_grpc as pb_grpc
from tests.agent_in_process import InProcessAgent, in_process_agent
from tests.benchmarks.stats import p50_p99
from tests.waiting import wait_for

log = logging.getLogger("local_api_streams")
TARGET_P99_MS = 10.0


def follow(socket: str, streams: int) -> int:
    """The child: `streams` WatchStatus streams, each on its own channel and thread;
    prints "ready" once each has a snapshot, and the per-stream counts (JSON) when its
    stdin closes."""
    counts = [0] * streams
    lock = threading.Lock()
    channels = [grpc.insecure_channel(f"unix:{socket}") for _ in range(streams)]
    calls = [pb_grpc.AgentStub(c).WatchStatus(pb.WatchStatusRequest()) for c in channels]

    def read(i: int) -> None:
        try:
            for _ in calls[i]:
                with lock:
                    counts[i] += 1
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.CANCELLED:  # type: ignore[attr-defined]
                print(f"stream {i}: {error}", file=sys.stderr)

    threads = [threading.Thread(target=read, args=(i,), daemon=True) for i in range(streams)]
    for thread in threads:
        thread.start()
    wait_for(lambda: min(counts) > 0, 30, f"all {streams} streams to get a snapshot")
    print("ready", flush=True)
    with lock:
        at_ready = list(counts)
    sys.stdin.read()  # until the parent closes it
    with lock:
        since = [now - then for now, then in zip(counts, at_ready, strict=True)]
    print(json.dumps({"snapshots_per_stream": since}), flush=True)
    for call in calls:
        call.cancel()
    return 0


def churn(agent: InProcessAgent, stop: threading.Event, per_second: float) -> None:
    """`per_second` status changes: a guest move recorded, as the link's journal does."""
    n = 0
    start = datetime(2026, 1, 1, tzinfo=UTC)
    while not stop.wait(1 / per_second):
        n += 1
        move = GuestMove(start + timedelta(seconds=n), f"w-{n:08x}", "started", "d-1", "bench")
        agent.engine.set_moves((move,))


def measure(agent: InProcessAgent, calls: int) -> tuple[list[float], int]:
    """Milliseconds per ReportActivity round trip, and how many calls failed."""
    latencies: list[float] = []
    failed = 0
    with AgentClient(agent.socket, timeout_s=2.0) as client:
        client.report_activity(datetime.now().astimezone(), 1)  # the channel is connected
        for _ in range(calls):
            time.sleep(random.uniform(0.005, 0.015))
            now = datetime.now().astimezone()
            start = time.perf_counter()
            try:
                client.report_activity(now, 1)
            except AgentUnavailable as error:
                failed += 1
                log.warning("ReportActivity failed: %s", error)
                continue
            latencies.append((time.perf_counter() - start) * 1000)
    return latencies, failed


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=500)
    parser.add_argument("--streams", type=int, default=50)
    parser.add_argument("--changes-per-s", type=float, default=10.0)
    parser.add_argument("--follow", metavar="SOCKET", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.follow:
        return follow(args.follow, args.streams)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("donor_app").setLevel(logging.WARNING)
    result: dict[str, object] = {
        "benchmark": "local_api_streams",
        "calls": args.calls,
        "status_changes_per_s": args.changes_per_s,
    }
    phases: dict[str, dict[str, float]] = {}
    failures: dict[str, int] = {}
    with in_process_agent() as agent:
        stop = threading.Event()
        changer = threading.Thread(
            target=churn, args=(agent, stop, args.changes_per_s), daemon=True
        )
        if args.changes_per_s > 0:
            changer.start()
        try:
            log.info("ReportActivity with no stream open")
            latencies, failures["streams_0"] = measure(agent, args.calls)
            phases["streams_0"] = p50_p99(latencies)
            log.info("opening %d streams in a child process", args.streams)
            follower = [sys.executable, __file__, "--follow", str(agent.socket)]
            child = subprocess.Popen(
                [*follower, "--streams", str(args.streams)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            assert child.stdin is not None and child.stdout is not None
            if child.stdout.readline().strip() != "ready":
                raise AssertionError("the stream follower did not get ready")
            log.info("ReportActivity with %d streams open", args.streams)
            latencies, failures[f"streams_{args.streams}"] = measure(agent, args.calls)
            phases[f"streams_{args.streams}"] = p50_p99(latencies)
            child.stdin.close()
            counts = json.loads(child.stdout.readline())["snapshots_per_stream"]
            child.wait(30)
        finally:
            stop.set()
            if changer.is_alive():
                changer.join()
    streams_key = f"streams_{args.streams}"
    result.update(
        {
            "cores": os.cpu_count(),
            "streams": args.streams,
            "report_activity_ms": phases,
            "failed_calls": failures,
            # Snapshots each stream got while the calls were measured (min, max).
            "snapshots_per_stream": {"min": min(counts), "max": max(counts)},
            "target": {"streams_50_p99_ms": TARGET_P99_MS, "failed_calls": 0},
        }
    )
    result["targets_met"] = (
        failures[streams_key] == 0
        and min(counts) > 0
        and phases[streams_key]["p99"] <= TARGET_P99_MS
    )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
