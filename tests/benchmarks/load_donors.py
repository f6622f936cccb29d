"""Load-generator worker for `coordinator_load.py`: a share of the simulated donors.

One asyncio loop holding `--count` donors. Each donor is enrolled for real (a fresh
EC key and CSR, the fleet token, over the TLS enrollment port) and then opens its own
grpc.aio channel with its own client certificate (mTLS: the certificate is the donor's
identity, so no two donors can share a connection), sends a Hello and then a Report
every `--interval` seconds. Donor i of `--total` reports at times ≡ i/total·interval
(mod interval) on the system-wide monotonic clock, so all workers together spread the
reports evenly instead of in lockstep.

Driven over stdin/stdout by the parent, one JSON object per stdout line:

    (start)            → {"event": "enrolled", "ok": n, "failed": n, "seconds": s}
    "connect"          → {"event": "connected", "ok": n, "failed": n, "seconds": s}
    "window T0 T1"     → after T1 (+ grace): {"event": "window", ...} (figures below)
    "quit"             → closes every stream and exits

Times T0/T1 are `time.monotonic()` values (the same clock in every process on Linux).
The window figures: acks received in [T0, T1); for reports *sent* in [T0, T1), the
client-side latency from just before the write to the ack's arrival (ms), and when the
slow ones (> 50 ms) arrived; reports of the window still unanswered after the grace
period; streams still open; this process's CPU, GC pauses and loop lag (a generator too
busy to read its acks adds to the latencies it measures). After connecting, the worker
freezes its heap and stops full collections, and it does not collect at all during the
window, so that its own GC does not pose as the coordinator's latency.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import os
import random
import resource
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc import aio

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from donor_app.agent.credentials import new_key_and_csr
from donor_app.proto.v1 import coordinator_pb2 as pb
from donor_app.proto.v1 import coordinator_pb2_grpc as pb_grpc

log = logging.getLogger("load_donors")

SLOW_MS = 50.0  # acks slower than this are listed (with when) to find stalls
MAX_SLOW = 20_000
GRACE_S = 5.0  # after the window, how long a report of the window may wait for its ack
HELLO_TIMEOUT_S = 120.0
# What every simulated donor offers (the same in each report: nothing for placement).
CAPACITY = pb.Capacity(
    cores=4, memory_mib=8192, arch="x86_64", lend_cpu_percent=50.0, lend_memory_mib=4096, idle=True
)


def raise_fd_limit() -> int:
    """Soft RLIMIT_NOFILE up to the hard limit (and the hard limit up to fs.nr_open if we
    may); returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        with open("/proc/sys/fs/nr_open") as f:
            wanted = int(f.read())
    except OSError:
        wanted = hard
    wanted = min(wanted, 1 << 20)
    for limit in (wanted, hard):
        if limit == resource.RLIM_INFINITY or limit < soft:
            continue
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (limit, max(limit, hard)))
            return limit
        except (ValueError, OSError):
            continue
    return soft


@dataclass(slots=True)
class Creds:
    key_pem: bytes
    cert_pem: bytes


@dataclass
class Window:
    start: float
    end: float
    acks: int = 0
    sent: int = 0
    latencies: list[float] = field(default_factory=list)
    slow: list[tuple[float, float]] = field(default_factory=list)  # (arrived, seconds)


@dataclass
class Shared:
    """What every donor of this worker updates."""

    address: str
    ca_pem: bytes
    interval: float
    total: int
    window: Window | None = None
    errors: Counter[str] = field(default_factory=Counter)
    open_streams: int = 0
    stop: asyncio.Event = field(default_factory=asyncio.Event)


def _error_name(error: BaseException) -> str:
    if isinstance(error, grpc.RpcError):
        code = error.code()
        return f"{code.name if code else 'rpc'}: {(error.details() or '')[:120]}"
    return f"{type(error).__name__}: {str(error)[:120]}"


class SimDonor:
    """One donor: its channel, its Connect call, its report schedule."""

    def __init__(self, index: int, creds: Creds, shared: Shared) -> None:
        self.index = index
        self.creds = creds
        self.shared = shared
        self.phase = index / shared.total * shared.interval
        self.channel: aio.Channel | None = None
        self.call: aio.StreamStreamCall[pb.DonorEvent, pb.Command] | None = None
        self.seq = 0
        self.sent: dict[int, float] = {}
        self.alive = False
        self.task: asyncio.Task[None] | None = None

    def _event(self, hello: bool) -> pb.DonorEvent:
        self.seq += 1
        if hello:
            return pb.DonorEvent(
                seq=self.seq, hello=pb.Hello(agent_version="load-0", capacity=CAPACITY)
            )
        return pb.DonorEvent(seq=self.seq, report=pb.Report(capacity=CAPACITY, level="run"))

    async def connect(self) -> None:
        """Open the stream, send Hello and wait for its Ack (Welcome comes first)."""
        credentials = grpc.ssl_channel_credentials(
            self.shared.ca_pem, self.creds.key_pem, self.creds.cert_pem
        )
        # A local subchannel pool: never share a connection between donors (they could
        # not anyway with different certificates; this makes it explicit).
        self.channel = aio.secure_channel(
            self.shared.address, credentials, options=[("grpc.use_local_subchannel_pool", 1)]
        )
        self.call = call = pb_grpc.CoordinatorStub(self.channel).Connect()
        await call.write(self._event(hello=True))
        hello_seq = self.seq
        while True:
            command = await call.read()
            if command is aio.EOF:
                raise ConnectionError("the coordinator ended the stream before the hello's ack")
            if command.WhichOneof("kind") == "ack" and command.ack.event_seq == hello_seq:
                break
        self.alive = True
        self.shared.open_streams += 1

    async def run(self) -> None:
        """Read acks in a side task; report on schedule until told to stop."""
        loop = asyncio.get_running_loop()
        call = self.call
        assert call is not None
        reader = asyncio.create_task(self._read(call))
        try:
            interval = self.shared.interval
            now = loop.time()
            # The next time ≡ phase (mod interval) after now.
            next_at = now - (now - self.phase) % interval + interval
            while self.alive and not self.shared.stop.is_set():
                await asyncio.sleep(max(0.0, next_at - loop.time()))
                if not self.alive or self.shared.stop.is_set():
                    break
                event = self._event(hello=False)
                sent_at = loop.time()
                self.sent[event.seq] = sent_at
                window = self.shared.window
                if window is not None and window.start <= sent_at < window.end:
                    window.sent += 1
                await call.write(event)
                next_at += interval
                # Fell far behind (a stalled loop): skip the missed slots, do not burst.
                while next_at < loop.time():
                    next_at += interval
        except asyncio.CancelledError:
            raise
        except Exception as error:
            self._lost(error)
        finally:
            reader.cancel()

    async def _read(self, call: aio.StreamStreamCall[pb.DonorEvent, pb.Command]) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                command = await call.read()
                if command is aio.EOF:
                    raise ConnectionError("the coordinator ended the stream")
                if command.WhichOneof("kind") != "ack":
                    continue
                arrived = loop.time()
                sent_at = self.sent.pop(command.ack.event_seq, None)
                window = self.shared.window
                if window is None or sent_at is None:
                    continue
                if window.start <= arrived < window.end:
                    window.acks += 1
                if window.start <= sent_at < window.end:
                    latency = arrived - sent_at
                    window.latencies.append(latency)
                    if latency * 1000 > SLOW_MS and len(window.slow) < MAX_SLOW:
                        window.slow.append((arrived, latency))
        except asyncio.CancelledError:
            raise
        except Exception as error:
            self._lost(error)

    def _lost(self, error: BaseException) -> None:
        if self.shared.stop.is_set():
            return
        if self.alive:
            self.alive = False
            self.shared.open_streams -= 1
        self.shared.errors[_error_name(error)] += 1
        log.debug("donor %d lost: %s", self.index, error)

    async def close(self) -> None:
        if self.call is not None:
            self.call.cancel()
        if self.channel is not None:
            await self.channel.close()


class GcPauses:
    """Garbage collections of the oldest generation or ≥ 5 ms: (monotonic, gen, ms)."""

    def __init__(self) -> None:
        self.pauses: list[tuple[float, int, float]] = []
        self._began = 0.0
        gc.callbacks.append(self._note)

    def _note(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._began = time.perf_counter()
            return
        ms = (time.perf_counter() - self._began) * 1000
        if info["generation"] == 2 or ms >= 5:
            self.pauses.append((time.monotonic(), info["generation"], round(ms, 2)))

    def within(self, start: float, end: float) -> list[list[float]]:
        return [[round(at - start, 2), gen, ms] for at, gen, ms in self.pauses if start <= at < end]


async def watch_loop(window: Window, lags: list[float]) -> None:
    """How late this loop wakes from 10 ms sleeps during the window: a generator too
    busy to read its acks adds that much to the latencies it measures."""
    loop = asyncio.get_running_loop()
    while loop.time() < window.end:
        before = loop.time()
        await asyncio.sleep(0.010)
        if window.start <= before:
            lags.append((loop.time() - before - 0.010) * 1000)


def emit(event: str, **fields: Any) -> None:
    sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


async def enroll_all(
    args: argparse.Namespace, ca_pem: bytes
) -> tuple[list[tuple[int, Creds]], Counter[str]]:
    enrolled: list[tuple[int, Creds]] = []
    errors: Counter[str] = Counter()
    gate = asyncio.Semaphore(args.enroll_concurrency)
    async with aio.secure_channel(
        args.enroll_address, grpc.ssl_channel_credentials(ca_pem)
    ) as channel:
        stub = pb_grpc.CoordinatorStub(channel)

        async def one(index: int) -> None:
            async with gate:
                key_pem, csr_pem = new_key_and_csr()
                try:
                    reply = await stub.Enroll(
                        pb.EnrollRequest(
                            token=args.token, csr_pem=csr_pem, hostname=f"load-{index}"
                        ),
                        timeout=120,
                    )
                except grpc.RpcError as error:
                    errors[_error_name(error)] += 1
                    return
                enrolled.append((index, Creds(key_pem, reply.certificate_pem)))

        indices = range(args.first_index, args.first_index + args.count * args.stride, args.stride)
        await asyncio.gather(*(one(i) for i in indices))
    enrolled.sort(key=lambda pair: pair[0])
    return enrolled, errors


async def connect_all(
    donors: list[SimDonor], concurrency: int, deadline_s: float
) -> tuple[int, int, Counter[str]]:
    """Connect every donor, at most `concurrency` handshakes at once. Like an agent, a
    donor whose attempt fails (or gets no ack for its Hello within HELLO_TIMEOUT_S)
    tries again after a jittered, growing backoff, until `deadline_s` from now. Returns
    (connected, retries, errors of the failed attempts)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + deadline_s
    gate = asyncio.Semaphore(concurrency)
    errors: Counter[str] = Counter()
    retries = 0

    async def one(donor: SimDonor) -> None:
        nonlocal retries
        for attempt in range(1_000):
            async with gate:
                try:
                    timeout = min(HELLO_TIMEOUT_S, max(1.0, deadline - loop.time()))
                    await asyncio.wait_for(donor.connect(), timeout)
                except Exception as error:
                    errors[_error_name(error)] += 1
                    await donor.close()
                else:
                    donor.task = asyncio.create_task(donor.run())
                    return
            if loop.time() >= deadline:
                return
            retries += 1
            await asyncio.sleep(random.uniform(0.5, 1.5) * min(30.0, 2.0**attempt))

    await asyncio.gather(*(one(d) for d in donors))
    return sum(d.alive for d in donors), retries, errors


def _stdin_lines(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[str]) -> None:
    for line in sys.stdin:
        loop.call_soon_threadsafe(queue.put_nowait, line.strip())
    loop.call_soon_threadsafe(queue.put_nowait, "quit")


async def amain(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    gc_pauses = GcPauses()
    commands: asyncio.Queue[str] = asyncio.Queue()
    threading.Thread(target=_stdin_lines, args=(loop, commands), daemon=True).start()
    with open(args.ca_file, "rb") as f:
        ca_pem = f.read()

    started = time.monotonic()
    enrolled, enroll_errors = await enroll_all(args, ca_pem)
    emit(
        "enrolled",
        ok=len(enrolled),
        failed=args.count - len(enrolled),
        errors=dict(enroll_errors),
        seconds=round(time.monotonic() - started, 2),
    )
    shared = Shared(args.address, ca_pem, args.interval, args.total)
    donors = [SimDonor(index, creds, shared) for index, creds in enrolled]

    while True:
        command = await commands.get()
        if command == "connect":
            started = time.monotonic()
            ok, retries, errors = await connect_all(
                donors, args.connect_concurrency, args.connect_deadline
            )
            # The generator is the instrument, not the subject: its own full garbage
            # collections (hundreds of ms with thousands of channels) would show up as
            # ack latency. Freeze what exists and leave the oldest generation alone.
            gc.collect()
            gc.freeze()
            gc.set_threshold(700, 10, 1_000_000)
            emit(
                "connected",
                ok=ok,
                failed=len(donors) - ok,
                retries=retries,
                errors=dict(errors),
                seconds=round(time.monotonic() - started, 2),
            )
        elif command.startswith("window "):
            _, t0, t1 = command.split()
            window = Window(float(t0), float(t1))
            shared.window = window
            # No collections at all in the window: even young ones took up to ~300 ms
            # here with the generator's core near saturation. What cyclic garbage the
            # window leaves (tens of MiB) is collected after it.
            gc.disable()
            lags: list[float] = []
            watcher = asyncio.create_task(watch_loop(window, lags))
            await asyncio.sleep(max(0.0, window.start - loop.time()))
            cpu_before = time.process_time()
            await asyncio.sleep(max(0.0, window.end - loop.time()))
            cpu_used = time.process_time() - cpu_before
            await watcher
            streams_at_end = shared.open_streams
            # Acks of the window's last reports may still be on their way.
            deadline = window.end + GRACE_S
            while loop.time() < deadline and len(window.latencies) < window.sent:
                await asyncio.sleep(0.05)
            shared.window = None
            gc.enable()
            emit(
                "window",
                acks=window.acks,
                sent=window.sent,
                unanswered=window.sent - len(window.latencies),
                latencies_ms=[round(x * 1000, 3) for x in window.latencies],
                open_streams=streams_at_end,
                errors=dict(shared.errors),
                cpu_s=round(cpu_used, 3),
                slow=[[round(at - window.start, 3), round(x * 1000, 1)] for at, x in window.slow],
                gc_pauses=gc_pauses.within(window.start, window.end),
                loop_lag={
                    "samples": len(lags),
                    "over_50ms": sum(x > 50 for x in lags),
                    "max_ms": round(max(lags, default=0.0), 1),
                },
            )
        elif command == "quit":
            break
    shared.stop.set()
    for donor in donors:
        if donor.task is not None:
            donor.task.cancel()
    await asyncio.gather(*(d.close() for d in donors), return_exceptions=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", required=True, help="the coordinator's main port")
    parser.add_argument("--enroll-address", required=True)
    parser.add_argument("--ca-file", required=True)
    parser.add_argument("--token", required=True, help="a fleet token with enough uses")
    parser.add_argument("--count", type=int, required=True, help="donors in this worker")
    parser.add_argument("--first-index", type=int, default=0, help="index of its first donor")
    parser.add_argument(
        "--stride",
        type=int,
        default=1,
        help="its donors are first-index + k·stride (workers interleave, so each worker's"
        " reports spread over the whole interval and a stall seen by all is the coordinator's)",
    )
    parser.add_argument("--total", type=int, required=True, help="donors over all workers")
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between reports")
    parser.add_argument("--cpu", type=int, default=None, help="pin this process to that core")
    parser.add_argument("--enroll-concurrency", type=int, default=16)
    parser.add_argument("--connect-concurrency", type=int, default=50)
    parser.add_argument(
        "--connect-deadline", type=float, default=600.0, help="seconds to get every donor in"
    )
    args = parser.parse_args()
    if args.cpu is not None:
        # Before grpc starts its threads, so they inherit the affinity.
        os.sched_setaffinity(0, {args.cpu})
    raise_fd_limit()
    logging.basicConfig(level=logging.WARNING, format="load_donors: %(message)s")
    asyncio.run(amain(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
