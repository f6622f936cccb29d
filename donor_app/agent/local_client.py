"""A client of the agent's local API, in domain types (for the tray and the CLI)."""

from __future__ import annotations

import tomllib
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import grpc

from donor_app.agent.local_limits import CHANNEL_OPTIONS
from donor_app.domain.history import HourBucket, Totals
from donor_app.domain.settings import Settings
from donor_app.domain.status import AgentStatus
from donor_app.proto import serde
from donor_app.proto.v1 import agent_pb2 as pb
from donor_app.proto.v1 import agent_pb2_grpc as pb_grpc
from donor_app.settings.config import dump_settings, parse_settings


class AgentUnavailable(ConnectionError):
    """No agent answers on the socket (not running, or not ours to talk to)."""


class AgentRefused(ValueError):
    """The agent refused the request; the message names the field and the reason."""


def _translate(error: grpc.RpcError) -> Exception:
    code = error.code() if isinstance(error, grpc.Call) else None
    details = error.details() if isinstance(error, grpc.Call) else str(error)
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return AgentRefused(details)
    return AgentUnavailable(f"agent: {details} ({code.name if code else 'error'})")


class AgentClient:
    """One channel to the agent's socket; thread-safe, as gRPC channels are."""

    def __init__(self, socket_path: Path, timeout_s: float = 5.0) -> None:
        self.socket_path = socket_path
        self._timeout = timeout_s
        self._channel = grpc.insecure_channel(f"unix:{socket_path}", options=CHANNEL_OPTIONS)
        self._stub = pb_grpc.AgentStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> AgentClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def watch(self) -> Iterator[AgentStatus]:
        """Status snapshots as the agent publishes them, until the channel closes."""
        try:
            for message in self._stub.WatchStatus(pb.WatchStatusRequest()):
                yield serde.status_from_proto(message)
        except grpc.RpcError as error:
            if isinstance(error, grpc.Call) and error.code() == grpc.StatusCode.CANCELLED:
                return
            raise _translate(error) from error

    def status(self) -> AgentStatus:
        """The agent's status now."""
        stream = self._stub.WatchStatus(pb.WatchStatusRequest(), timeout=self._timeout)
        try:
            return serde.status_from_proto(next(iter(stream)))
        except grpc.RpcError as error:
            raise _translate(error) from error
        finally:
            stream.cancel()

    def report_activity(self, last_input: datetime, events: int) -> None:
        request = pb.ActivityReport(last_input=serde.timestamp(last_input), events=events)
        try:
            self._stub.ReportActivity(request, timeout=self._timeout)
        except grpc.RpcError as error:
            raise _translate(error) from error

    def settings(self) -> tuple[Settings, dict[str, str]]:
        """The owner's settings and the fields the fleet locks (key → admin's reason)."""
        try:
            reply = self._stub.GetSettings(pb.GetSettingsRequest(), timeout=self._timeout)
        except grpc.RpcError as error:
            raise _translate(error) from error
        return self._parse(reply)

    def update_settings(self, settings: Settings) -> tuple[Settings, dict[str, str]]:
        try:
            reply = self._stub.UpdateSettings(
                pb.Settings(toml=dump_settings(settings)), timeout=self._timeout
            )
        except grpc.RpcError as error:
            raise _translate(error) from error
        return self._parse(reply)

    @staticmethod
    def _parse(reply: pb.Settings) -> tuple[Settings, dict[str, str]]:
        settings = parse_settings(tomllib.loads(reply.toml), Path("settings from the agent"))
        return settings, dict(reply.locked)

    def snooze(self, until: datetime | None) -> AgentStatus:
        """Stop donating until `until`; None: until `resume()`."""
        request = (
            pb.SnoozeRequest(indefinitely=True)
            if until is None
            else pb.SnoozeRequest(until=serde.timestamp(until))
        )
        try:
            return serde.status_from_proto(self._stub.Snooze(request, timeout=self._timeout))
        except grpc.RpcError as error:
            raise _translate(error) from error

    def resume(self) -> AgentStatus:
        try:
            reply = self._stub.Resume(pb.ResumeRequest(), timeout=self._timeout)
        except grpc.RpcError as error:
            raise _translate(error) from error
        return serde.status_from_proto(reply)

    def history(self, start: datetime, end: datetime) -> tuple[list[HourBucket], Totals]:
        request = pb.HistoryRequest(start=serde.timestamp(start), end=serde.timestamp(end))
        try:
            return serde.history_from_proto(self._stub.GetHistory(request, timeout=self._timeout))
        except grpc.RpcError as error:
            raise _translate(error) from error
