"""The agent's local API: gRPC over a Unix socket, for the tray and for root. (About 500
lines: one servicer, each RPC a few lines of checks, and the server that runs it.)

Who may call: the socket is created with mode 0600 (umask held while it is bound, so
there is no moment when it is open to others) and, for a system agent, handed to the
desk's owner with `owner_uid`; its directory is 0700 for a user agent. Anyone else is
refused by the kernel at connect(). Every request is validated and answered with
INVALID_ARGUMENT naming the field; messages are limited to `local_limits.MAX_MESSAGE_BYTES`.

How it is served: a grpc.aio server on one asyncio loop, on its own thread (`local-api`).
Every RPC is a coroutine there; nothing on the loop blocks:

- A status stream (WatchStatus) is a coroutine waiting for the next snapshot, not a
  thread. Several users and trays on a system agent each hold one for as long as they
  run, so with a worker thread per stream a handful of them used up the server and the
  calls behind them timed out.
- ReportActivity (the owner is back: the path that gives the machine back) runs on the
  loop itself. It only records the time and wakes the engine (a lock held for
  microseconds), so it never waits for a worker to come free. The other way out, a
  thread-per-stream server with streams capped in a pool of their own, keeps unary calls
  answering too, but every snapshot wakes every stream's thread, and the call competes
  with all of them for the GIL: with 50 streams open its ReportActivity tail was the
  longer one (tests/benchmarks/local_api_streams.py measures it), and it costs a thread
  per stream. On the loop, a snapshot wakes the streams a few at a time (`_WAKE_BATCH`),
  so a call that arrives meanwhile waits for one batch, not for all of them.
- Calls that need the engine (settings, snooze, resume) are handed to the engine thread
  with `Engine.submit` and awaited. History queries and settings parsing, which can take
  milliseconds, run in a small pool (`local-api-io`).

Snapshots reach the streams through one thread (`local-api-status`) that follows the
engine's watcher, converts each snapshot to its wire form once and hands it to the loop.
Each stream keeps only the newest snapshot it has not sent yet, and sends the next only
when gRPC took the previous one (flow control), so a client that opens streams and never
reads costs one snapshot per stream, never a growing queue.

Limits: at most `max_streams` status streams at once and `MAX_WAITING_CALLS` calls
waiting on the engine or the pool; past either, RESOURCE_EXHAUSTED says which. Neither
limit applies to ReportActivity, which waits on nothing.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, NoReturn, Protocol, TypeVar

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from grpc import aio

from donor_app.agent.engine import Engine
from donor_app.agent.history import MAX_BUCKETS
from donor_app.agent.history_file import HistoryError
from donor_app.agent.local_limits import CHANNEL_OPTIONS
from donor_app.domain.fleet import locked_fields
from donor_app.domain.history import HourBucket, Totals
from donor_app.domain.settings import MAX_SNOOZE, Settings
from donor_app.proto import serde
from donor_app.proto.v1 import agent_pb2 as pb
from donor_app.proto.v1 import agent_pb2_grpc as pb_grpc
from donor_app.settings.config import ConfigError, dump_settings, parse_settings, parse_toml

log = logging.getLogger(__name__)
T = TypeVar("T")
Context = aio.ServicerContext[Any, Any]

MAX_SETTINGS_BYTES = 64 * 1024
# Flooring the start and ceiling the end to whole hours adds at most one bucket.
MAX_HISTORY_SPAN = timedelta(hours=MAX_BUCKETS - 1)
CLOCK_SKEW = timedelta(seconds=5)
SETTINGS_SOURCE = Path("settings sent by the tray")

MAX_STREAMS = 256
"""Status streams open at once: a tray holds one, so this is many users' worth."""
MAX_WAITING_CALLS = 32
"""Calls waiting on the engine or the pool at once (the engine runs them one by one)."""
ENGINE_TIMEOUT_S = 30.0
START_TIMEOUT_S = 30.0
# Past the two limits above: room for calls that never wait (ReportActivity), so gRPC's
# own limit, a backstop against a flood, never refuses them first.
_QUICK_CALLS = 64
# How often the status thread looks up from the engine's queue to see if it must stop.
_STATUS_POLL_S = 0.25
# Streams woken at once by a new snapshot before other work on the loop gets a turn.
_WAKE_BATCH = 4


class HistoryQuery(Protocol):
    def buckets(self, start: datetime, end: datetime) -> list[HourBucket]: ...
    def totals(self, start: datetime, end: datetime) -> Totals: ...


class _Stream:
    """One open WatchStatus stream: the newest snapshot it has not sent yet (at most one)."""

    def __init__(self) -> None:
        self.pending: pb.Status | None = None
        self.offered: pb.Status | None = None
        self.ended = False
        self.ready = asyncio.Event()

    def offer(self, message: pb.Status) -> None:
        if message is self.offered:
            return  # a delivery that went round again: this stream has it already
        self.offered = message
        self.pending = message  # an unsent older snapshot is dropped: only the newest counts
        self.ready.set()

    def end(self) -> None:
        self.ended = True
        self.ready.set()

    async def next(self) -> pb.Status | None:
        """The next snapshot to send; None once the server stops."""
        while self.pending is None and not self.ended:
            self.ready.clear()
            await self.ready.wait()
        message, self.pending = self.pending, None
        return None if self.ended else message


class _Streams:
    """The open status streams and the latest snapshot. Used on the loop only."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._open: set[_Stream] = set()
        self._latest: pb.Status | None = None
        self._version = 0
        self._delivery: asyncio.Task[None] | None = None
        self._ended = False

    def open(self) -> _Stream | None:
        """A new stream, primed with the latest snapshot; None at the limit."""
        if len(self._open) >= self.limit:
            return None
        stream = _Stream()
        if self._ended:
            stream.end()
        elif self._latest is not None:
            stream.offer(self._latest)
        self._open.add(stream)
        return stream

    def close(self, stream: _Stream) -> None:
        self._open.discard(stream)

    def publish(self, message: pb.Status) -> None:
        self._latest = message
        self._version += 1
        if self._delivery is None and not self._ended:
            self._delivery = asyncio.get_running_loop().create_task(self._deliver())

    async def _deliver(self) -> None:
        """Wake the streams a few at a time, yielding the loop in between.

        Each woken stream's write costs the loop some 0.1 ms; woken all at once, 50 of
        them kept a call that arrived meanwhile (ReportActivity) waiting for all 50.
        In batches it waits for one batch at most.
        """
        try:
            while True:
                version = self._version
                for i, stream in enumerate(list(self._open)):
                    if self._latest is not None:
                        stream.offer(self._latest)  # the newest, even if it came mid-way
                    if i % _WAKE_BATCH == _WAKE_BATCH - 1:
                        await asyncio.sleep(0)
                if version == self._version:
                    return
        finally:
            self._delivery = None

    def end_all(self) -> None:
        self._ended = True
        if self._delivery is not None:
            self._delivery.cancel()
        for stream in self._open:
            stream.end()

    def backlogs(self) -> list[int]:
        return [0 if s.pending is None else 1 for s in self._open]


async def _abort(context: Context, code: grpc.StatusCode, details: str) -> NoReturn:
    await context.abort(code, details)


class AgentServicer(pb_grpc.AgentServicer):
    """Thin: validates, converts with serde, and hands the work to the engine. Its
    methods are coroutines on the local API's loop (see the module docstring)."""

    def __init__(
        self,
        engine: Engine,
        history: HistoryQuery | None,
        streams: _Streams,
        io: ThreadPoolExecutor,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self._engine = engine
        self._history = history
        self._streams = streams
        self._io = io
        self._clock = clock or (lambda: datetime.now().astimezone())
        self._waiting = 0

    async def _moment(self, context: Context, path: str, stamp: Timestamp) -> datetime:
        try:
            return serde.moment_from_wire(path, stamp)
        except ValueError as exc:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))

    async def _wait(self, context: Context, what: str, submit: Callable[[], Future[T]]) -> T:
        """The result of the work `submit` hands over, counted against MAX_WAITING_CALLS;
        the work is dropped if the client goes away or ENGINE_TIMEOUT_S passes first."""
        if self._waiting >= MAX_WAITING_CALLS:
            await _abort(
                context,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{what}: {self._waiting} calls already waiting; at most {MAX_WAITING_CALLS}",
            )
        self._waiting += 1
        try:
            return await asyncio.wait_for(asyncio.wrap_future(submit()), ENGINE_TIMEOUT_S)
        except TimeoutError:
            await _abort(
                context,
                grpc.StatusCode.UNAVAILABLE,
                f"{what}: the agent did not answer within {ENGINE_TIMEOUT_S:.0f} s",
            )
        finally:
            self._waiting -= 1

    async def _on_engine(self, context: Context, what: str, fn: Callable[[], T]) -> T:
        return await self._wait(context, what, lambda: self._engine.submit(fn))

    async def _in_pool(self, context: Context, what: str, fn: Callable[[], T]) -> T:
        return await self._wait(context, what, lambda: self._io.submit(fn))

    async def WatchStatus(
        self, request: pb.WatchStatusRequest, context: Context
    ) -> AsyncIterator[pb.Status]:
        stream = self._streams.open()
        if stream is None:
            await _abort(
                context,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"WatchStatus: {self._streams.limit} streams open; at most {self._streams.limit}",
            )
        try:
            while (message := await stream.next()) is not None:
                yield message
        finally:
            self._streams.close(stream)

    async def ReportActivity(self, request: pb.ActivityReport, context: Context) -> pb.ActivityAck:
        if not request.HasField("last_input"):
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "last_input: required")
        last_input = await self._moment(context, "last_input", request.last_input)
        now = self._clock()
        if last_input > now + CLOCK_SKEW:
            await _abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"last_input: {last_input.isoformat()} is in the future (now {now.isoformat()})",
            )
        self._engine.report_activity(min(last_input, now), request.events)
        level = self._engine.level
        if level is None:
            return pb.ActivityAck()
        return pb.ActivityAck(level=serde.level_to_proto(level))

    async def _settings_message(self, context: Context, what: str) -> pb.Settings:
        settings, fleet = await self._on_engine(
            context, what, lambda: (self._engine.current_settings(), self._engine.current_fleet())
        )
        return pb.Settings(toml=dump_settings(settings), locked=locked_fields(settings, fleet))

    async def GetSettings(self, request: pb.GetSettingsRequest, context: Context) -> pb.Settings:
        return await self._settings_message(context, "GetSettings")

    async def UpdateSettings(self, request: pb.Settings, context: Context) -> pb.Settings:
        size = len(request.toml.encode())
        if size > MAX_SETTINGS_BYTES:
            await _abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"toml: {size} bytes; at most {MAX_SETTINGS_BYTES}",
            )
        parsed = await self._in_pool(
            context, "UpdateSettings", lambda: _parse(request.toml, self._clock())
        )
        if isinstance(parsed, str):
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, parsed)
        try:
            await self._on_engine(
                context, "UpdateSettings", lambda: self._engine.update_settings(parsed)
            )
        except OSError as exc:
            await _abort(context, grpc.StatusCode.INTERNAL, f"settings could not be saved: {exc}")
        return await self._settings_message(context, "UpdateSettings")

    async def Snooze(self, request: pb.SnoozeRequest, context: Context) -> pb.Status:
        until: datetime | None = None
        if not request.indefinitely:
            if not request.HasField("until"):
                await _abort(
                    context,
                    grpc.StatusCode.INVALID_ARGUMENT,
                    "until: required unless indefinitely",
                )
            until = await self._moment(context, "until", request.until)
            now = self._clock()
            if not now < until <= now + MAX_SNOOZE:
                await _abort(
                    context,
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"until: {until.isoformat()} must be in the future and within "
                    f"{MAX_SNOOZE.days} days",
                )
        status = await self._on_engine(context, "Snooze", lambda: self._engine.snooze(until))
        return serde.status_to_proto(status)

    async def Resume(self, request: pb.ResumeRequest, context: Context) -> pb.Status:
        status = await self._on_engine(context, "Resume", self._engine.resume_donating)
        return serde.status_to_proto(status)

    async def GetHistory(self, request: pb.HistoryRequest, context: Context) -> pb.History:
        history = self._history
        if history is None:
            await _abort(context, grpc.StatusCode.UNAVAILABLE, "history: not kept by this agent")
        if not (request.HasField("start") and request.HasField("end")):
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "start, end: both required")
        start = await self._moment(context, "start", request.start)
        end = await self._moment(context, "end", request.end)
        # As a difference, not `start + span`: near year 9999 the sum does not exist.
        if not (start < end and end - start <= MAX_HISTORY_SPAN):
            hours = MAX_HISTORY_SPAN // timedelta(hours=1)
            await _abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"end: must be after start and at most {hours} hours later",
            )

        def query() -> pb.History:
            return serde.history_to_proto(history.buckets(start, end), history.totals(start, end))

        try:
            return await self._in_pool(context, "GetHistory", query)
        except ValueError as exc:  # the store's own checks name the field
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except HistoryError as exc:
            await _abort(context, grpc.StatusCode.INTERNAL, str(exc))


def _parse(toml: str, now: datetime) -> Settings | str:
    """The settings in `toml`, or what is wrong with them (naming the key; "toml" when the
    text itself is not TOML Python can hold), by the same rules as the settings file."""
    try:
        return parse_settings(parse_toml(toml.encode(), SETTINGS_SOURCE), SETTINGS_SOURCE, now=now)
    except ConfigError as exc:
        return f"{exc.key}: {exc.reason}" if exc.key else f"toml: {exc.reason}"


class AgentAlreadyRunning(RuntimeError):
    """Another agent answers on the socket; starting a second one would fight it."""


def _socket_answers(path: Path) -> bool:
    channel = grpc.insecure_channel(f"unix:{path}")
    try:
        grpc.channel_ready_future(channel).result(timeout=1.0)
    except grpc.FutureTimeoutError:
        return False
    finally:
        channel.close()
    return True


class LocalApiServer:
    """Serves `AgentServicer` on a Unix socket. start() binds; stop() removes it."""

    def __init__(
        self,
        engine: Engine,
        history: HistoryQuery | None,
        socket_path: Path,
        *,
        owner_uid: int | None = None,
        clock: Callable[[], datetime] | None = None,
        max_streams: int = MAX_STREAMS,
    ) -> None:
        self.socket_path = socket_path
        self._owner_uid = owner_uid
        self._engine = engine
        self._history = history
        self._clock = clock
        self._streams = _Streams(max_streams)
        self._stopping = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: threading.Thread | None = None
        self._status_thread: threading.Thread | None = None
        self._io: ThreadPoolExecutor | None = None
        self._server: aio.Server | None = None

    def start(self) -> None:
        path = self.socket_path
        if not path.parent.exists():
            path.parent.mkdir(parents=True, mode=0o700)
        if path.exists() or path.is_symlink():
            if _socket_answers(path):
                raise AgentAlreadyRunning(f"an agent already answers on {path}")
            path.unlink()  # left over by an agent that died
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._loop_thread = threading.Thread(target=loop.run_forever, name="local-api", daemon=True)
        self._loop_thread.start()
        self._io = ThreadPoolExecutor(max_workers=2, thread_name_prefix="local-api-io")
        self._status_thread = threading.Thread(
            target=self._follow_engine, args=(loop,), name="local-api-status", daemon=True
        )
        self._status_thread.start()
        try:
            # umask is process-wide; this runs at start-up, before other threads create
            # files, and the loop thread binds the socket while we wait here.
            old_umask = os.umask(0o177)
            try:
                asyncio.run_coroutine_threadsafe(self._serve(path), loop).result(START_TIMEOUT_S)
            finally:
                os.umask(old_umask)
            path.chmod(0o600)
            if self._owner_uid is not None:
                os.chown(path, self._owner_uid, -1)
        except BaseException:
            self.stop(grace_s=0)
            raise
        log.info("local API on %s", path)

    async def _serve(self, path: Path) -> None:
        assert self._io is not None
        server = aio.server(
            options=CHANNEL_OPTIONS,
            maximum_concurrent_rpcs=self._streams.limit + MAX_WAITING_CALLS + _QUICK_CALLS,
        )
        servicer = AgentServicer(self._engine, self._history, self._streams, self._io, self._clock)
        pb_grpc.add_AgentServicer_to_server(servicer, server)
        server.add_insecure_port(f"unix:{path}")
        await server.start()
        self._server = server

    def _follow_engine(self, loop: asyncio.AbstractEventLoop) -> None:
        """The `local-api-status` thread: the engine's snapshots, in wire form, to the loop."""
        watcher = self._engine.watch()
        try:
            while not self._stopping.is_set():
                try:
                    status = watcher.get(timeout=_STATUS_POLL_S)
                except queue.Empty:
                    continue
                loop.call_soon_threadsafe(self._streams.publish, serde.status_to_proto(status))
        finally:
            self._engine.unwatch(watcher)

    def stream_backlogs(self) -> list[int]:
        """For each open status stream, the snapshots waiting to be sent (0 or 1)."""
        assert self._loop is not None

        async def read() -> list[int]:
            return self._streams.backlogs()

        return asyncio.run_coroutine_threadsafe(read(), self._loop).result(5)

    def stop(self, grace_s: float = 1.0) -> None:
        self._stopping.set()
        if self._status_thread is not None:
            self._status_thread.join()
            self._status_thread = None
        loop, server = self._loop, self._server
        if loop is not None:
            if server is not None:

                async def stop_serving() -> None:
                    self._streams.end_all()  # streams end cleanly instead of waiting out grace
                    await server.stop(grace_s)

                asyncio.run_coroutine_threadsafe(stop_serving(), loop).result(grace_s + 10)
                self._server = None
            loop.call_soon_threadsafe(loop.stop)
            if self._loop_thread is not None:
                self._loop_thread.join(10)
                self._loop_thread = None
            loop.close()
            self._loop = None
        if self._io is not None:
            self._io.shutdown(wait=False, cancel_futures=True)
            self._io = None
        self.socket_path.unlink(missing_ok=True)
