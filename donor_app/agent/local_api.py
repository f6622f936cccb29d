"""The agent's local API: gRPC over a Unix socket, for the tray and for root.

Who may call: the socket is created with mode 0600 (umask held while it is bound, so
there is no moment when it is open to others) and, for a system agent, handed to the
desk's owner with `owner_uid`; its directory is 0700 for a user agent. Anyone else is
refused by the kernel at connect(). Every request is validated and answered with
INVALID_ARGUMENT naming the field; messages are limited to `local_limits.MAX_MESSAGE_BYTES`.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import tomllib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from pathlib import Path
from typing import Protocol

import grpc

from donor_app.agent.engine import Engine
from donor_app.agent.local_limits import CHANNEL_OPTIONS
from donor_app.domain.fleet import locked_fields
from donor_app.domain.history import HourBucket, Totals
from donor_app.proto import serde
from donor_app.proto.v1 import agent_pb2 as pb
from donor_app.proto.v1 import agent_pb2_grpc as pb_grpc
from donor_app.settings.config import ConfigError, dump_settings, parse_settings

log = logging.getLogger(__name__)

MAX_SETTINGS_BYTES = 64 * 1024
MAX_SNOOZE = timedelta(days=366)
MAX_HISTORY_SPAN = timedelta(days=400)
CLOCK_SKEW = timedelta(seconds=5)
SETTINGS_SOURCE = Path("settings sent by the tray")


class HistoryQuery(Protocol):
    def buckets(self, start: datetime, end: datetime) -> list[HourBucket]: ...
    def totals(self, start: datetime, end: datetime) -> Totals: ...


class AgentServicer(pb_grpc.AgentServicer):
    """Thin: validates, converts with serde, and hands the work to the engine."""

    def __init__(
        self,
        engine: Engine,
        history: HistoryQuery | None,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self._engine = engine
        self._history = history
        self._clock = clock or (lambda: datetime.now().astimezone())
        self.stopping = threading.Event()

    def WatchStatus(
        self, request: pb.WatchStatusRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.Status]:
        watcher = self._engine.watch()
        try:
            while context.is_active() and not self.stopping.is_set():
                try:
                    status = watcher.get(timeout=0.5)
                except queue.Empty:
                    continue
                yield serde.status_to_proto(status)
        finally:
            self._engine.unwatch(watcher)

    def ReportActivity(
        self, request: pb.ActivityReport, context: grpc.ServicerContext
    ) -> pb.ActivityAck:
        if not request.HasField("last_input"):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "last_input: required")
        last_input = serde.moment(request.last_input)
        now = self._clock()
        if last_input > now + CLOCK_SKEW:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"last_input: {last_input.isoformat()} is in the future (now {now.isoformat()})",
            )
        self._engine.report_activity(min(last_input, now), request.events)
        level = self._engine.level
        if level is None:
            return pb.ActivityAck()
        return pb.ActivityAck(level=serde.level_to_proto(level))

    def _settings_message(self) -> pb.Settings:
        settings, fleet = self._engine.call(
            lambda: (self._engine.current_settings(), self._engine.current_fleet())
        )
        return pb.Settings(toml=dump_settings(settings), locked=locked_fields(settings, fleet))

    def GetSettings(
        self, request: pb.GetSettingsRequest, context: grpc.ServicerContext
    ) -> pb.Settings:
        return self._settings_message()

    def UpdateSettings(self, request: pb.Settings, context: grpc.ServicerContext) -> pb.Settings:
        if len(request.toml.encode()) > MAX_SETTINGS_BYTES:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"toml: {len(request.toml.encode())} bytes; at most {MAX_SETTINGS_BYTES}",
            )
        try:
            settings = parse_settings(tomllib.loads(request.toml), SETTINGS_SOURCE)
        except tomllib.TOMLDecodeError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"toml: not valid TOML: {exc}")
        except ConfigError as exc:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{exc.key}: {exc.reason}" if exc.key else exc.reason,
            )
        try:
            self._engine.call(lambda: self._engine.update_settings(settings))
        except OSError as exc:
            context.abort(grpc.StatusCode.INTERNAL, f"settings could not be saved: {exc}")
        return self._settings_message()

    def Snooze(self, request: pb.SnoozeRequest, context: grpc.ServicerContext) -> pb.Status:
        until: datetime | None = None
        if not request.indefinitely:
            if not request.HasField("until"):
                context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT, "until: required unless indefinitely"
                )
            until = serde.moment(request.until)
            now = self._clock()
            if not now < until <= now + MAX_SNOOZE:
                context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"until: {until.isoformat()} must be in the future and within "
                    f"{MAX_SNOOZE.days} days",
                )
        status = self._engine.call(lambda: self._engine.snooze(until))
        return serde.status_to_proto(status)

    def Resume(self, request: pb.ResumeRequest, context: grpc.ServicerContext) -> pb.Status:
        return serde.status_to_proto(self._engine.call(self._engine.resume_donating))

    def GetHistory(self, request: pb.HistoryRequest, context: grpc.ServicerContext) -> pb.History:
        if self._history is None:
            context.abort(grpc.StatusCode.UNAVAILABLE, "history: not kept by this agent")
        if not (request.HasField("start") and request.HasField("end")):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "start, end: both required")
        start, end = serde.moment(request.start), serde.moment(request.end)
        if not start < end <= start + MAX_HISTORY_SPAN:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"end: must be after start and at most {MAX_HISTORY_SPAN.days} days later",
            )
        return serde.history_to_proto(
            self._history.buckets(start, end), self._history.totals(start, end)
        )


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
    ) -> None:
        self.socket_path = socket_path
        self._owner_uid = owner_uid
        self._servicer = AgentServicer(engine, history, clock)
        self._server: grpc.Server | None = None

    def start(self) -> None:
        path = self.socket_path
        if not path.parent.exists():
            path.parent.mkdir(parents=True, mode=0o700)
        if path.exists() or path.is_symlink():
            if _socket_answers(path):
                raise AgentAlreadyRunning(f"an agent already answers on {path}")
            path.unlink()  # left over by an agent that died
        server = grpc.server(
            ThreadPoolExecutor(max_workers=8, thread_name_prefix="local-api"),
            options=CHANNEL_OPTIONS,
            maximum_concurrent_rpcs=32,
        )
        pb_grpc.add_AgentServicer_to_server(self._servicer, server)
        # umask is process-wide; this runs at start-up, before other threads create files.
        old_umask = os.umask(0o177)
        try:
            server.add_insecure_port(f"unix:{path}")
            server.start()
        finally:
            os.umask(old_umask)
        path.chmod(0o600)
        if self._owner_uid is not None:
            os.chown(path, self._owner_uid, -1)
        self._server = server
        log.info("local API on %s", path)

    def stop(self, grace_s: float = 1.0) -> None:
        self._servicer.stopping.set()
        if self._server is not None:
            self._server.stop(grace_s).wait()
            self._server = None
        self.socket_path.unlink(missing_ok=True)
