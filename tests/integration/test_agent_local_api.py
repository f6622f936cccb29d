"""The agent through its real local API: engine + real libvirt (test:/// driver) + gRPC.

The real QEMU path (and real input under Xvfb) is in tests/e2e/test_agent_e2e.py.
"""

from __future__ import annotations

import itertools
import os
import pwd
import subprocess
import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from donor_app.agent.link.journal import MoveJournal
from donor_app.agent.local_api import AgentAlreadyRunning, LocalApiServer
from donor_app.agent.local_client import AgentClient, AgentRefused, AgentUnavailable
from donor_app.domain.decision import Cause, Level
from donor_app.domain.guest import GuestState
from donor_app.domain.status import AgentStatus, GuestMove
from donor_app.proto import serde
from donor_app.proto.v1 import agent_pb2 as pb
from donor_app.proto.v1 import agent_pb2_grpc as pb_grpc
from donor_app.settings.config import load_settings
from tests.agent_in_process import InProcessAgent, in_process_agent
from tests.waiting import wait_for


@pytest.fixture
def agent() -> Iterator[InProcessAgent]:
    with in_process_agent() as running:
        yield running


def _state(agent: InProcessAgent) -> GuestState:
    return agent.hv.state("g1")


def test_status_shows_the_guest_donating_while_idle(agent: InProcessAgent):
    status = wait_for(
        lambda: (s := agent.client.status()).guests and s, 10, "a status with the guest"
    )
    assert status.decision.level is Level.RUN
    assert status.decision.cause is Cause.IDLE
    assert [g.name for g in status.guests] == ["g1"]
    assert status.guests[0].state == "running"


def test_reported_input_pauses_at_once_and_idleness_resumes(agent: InProcessAgent):
    wait_for(lambda: agent.engine.level is Level.RUN, 10, "the engine to decide RUN")
    agent.client.report_activity(datetime.now().astimezone(), events=3)
    wait_for(lambda: _state(agent) is GuestState.PAUSED, 2, "the guest to be paused")
    status = agent.client.status()
    assert status.decision.cause is Cause.OWNER_ACTIVE
    assert "using this computer" in status.decision.reason
    # idle_after = 1 s in the settings file: the guest runs again by itself.
    wait_for(lambda: _state(agent) is GuestState.RUNNING, 10, "the guest to resume")


def test_watch_streams_a_new_snapshot_when_the_level_changes(agent: InProcessAgent):
    stream = agent.client.watch()
    first = next(stream)
    assert first.decision.level is Level.RUN
    agent.client.report_activity(datetime.now().astimezone(), events=1)
    paused = next(s for s in stream if s.decision.level is Level.PAUSED)
    assert paused.decision.cause is Cause.OWNER_ACTIVE


def test_a_journaled_guest_move_reaches_the_watchers(agent: InProcessAgent, tmp_path: Path):
    stream = agent.client.watch()
    assert next(stream).moves == ()
    journal = MoveJournal(tmp_path / "fleet-moves.json", on_change=agent.engine.set_moves)
    journal.record("arrived", "w-3f2a9c0d11223344", "d-91c0aa5500112233", "live")
    moved = next(s for s in stream if s.moves)
    assert moved.moves == journal.recent()
    journal.record("left", "w-3f2a9c0d11223344", "d-91c0aa5500112233", "live, 2.3 s")
    left = next(s for s in stream if len(s.moves) == 2)
    assert [m.event for m in left.moves] == ["left", "arrived"]


def test_snooze_pauses_until_resume(agent: InProcessAgent):
    until = datetime.now().astimezone() + timedelta(hours=1)
    status = agent.client.snooze(until)
    assert status.decision.cause is Cause.SNOOZED
    assert status.snoozed_until is not None
    assert abs((status.snoozed_until - until).total_seconds()) < 1
    assert _state(agent) is GuestState.PAUSED
    assert load_settings(agent.settings_file).snooze_until is not None  # survives restarts
    status = agent.client.resume()
    assert status.decision.cause is not Cause.SNOOZED
    wait_for(lambda: _state(agent) is GuestState.RUNNING, 5, "the guest to run again")


def test_snooze_until_i_resume(agent: InProcessAgent):
    status = agent.client.snooze(None)
    assert status.snoozed_indefinitely
    assert status.decision.level is Level.PAUSED
    assert status.decision.reason == "Paused until you resume donating"


@pytest.mark.parametrize(
    ("toml", "named"),
    [
        ("idle_after = -5\n", "idle_after"),
        ("[caps.idle]\ncpu_percent = 150\n", "caps.idle.cpu_percent"),
        ("colour = 'blue'\n", "colour"),
        ("idle_after = \n", "not valid TOML"),
    ],
)
def test_invalid_settings_are_refused_naming_the_key_and_nothing_changes(
    agent: InProcessAgent, toml: str, named: str
):
    before = agent.settings_file.read_bytes()
    stub = pb_grpc.AgentStub(grpc.insecure_channel(f"unix:{agent.socket}"))
    with pytest.raises(grpc.RpcError) as caught:
        stub.UpdateSettings(pb.Settings(toml=toml), timeout=5)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert named in caught.value.details()
    assert agent.settings_file.read_bytes() == before


def test_valid_settings_are_saved_and_applied(agent: InProcessAgent):
    settings, locked = agent.client.settings()
    assert locked == {}
    from dataclasses import replace

    saved, _ = agent.client.update_settings(replace(settings, idle_after=timedelta(seconds=42)))
    assert saved.idle_after == timedelta(seconds=42)
    assert load_settings(agent.settings_file).idle_after == timedelta(seconds=42)


def test_input_reported_from_the_future_is_refused(agent: InProcessAgent):
    with pytest.raises(AgentRefused, match="last_input: .* is in the future"):
        agent.client.report_activity(datetime.now().astimezone() + timedelta(hours=1), 1)


def test_history_is_served_and_its_span_is_checked():
    now = datetime.now().astimezone()
    two_hours_ago = now - timedelta(hours=2)
    recorded = [(two_hours_ago, 3600.0, 2.0), (now, 1800.0, 0.5)]
    start, end = now - timedelta(hours=3), now + timedelta(seconds=1)
    with in_process_agent(history=recorded) as agent:
        buckets, totals = agent.client.history(start, end)
        with pytest.raises(AgentRefused, match="end: must be after start"):
            agent.client.history(now, now - timedelta(hours=1))
    # One bucket per UTC hour of the span, none missing; the test guest donates nothing
    # worth counting (test:/// uses no CPU), so the sums are what was recorded.
    hours = [b.start for b in buckets]
    assert hours[0] <= start < hours[0] + timedelta(hours=1)
    assert hours[-1] <= end <= hours[-1] + timedelta(hours=1)
    assert all(b - a == timedelta(hours=1) for a, b in itertools.pairwise(hours))
    (earlier,) = [b for b in buckets if b.start <= two_hours_ago < b.start + timedelta(hours=1)]
    assert earlier.cpu_seconds == pytest.approx(3600.0, abs=1)
    assert earlier.memory_gib_hours == pytest.approx(2.0, abs=0.01)
    assert totals.cpu_hours == pytest.approx(1.5, abs=0.01)
    assert totals.gib_hours == pytest.approx(2.5, abs=0.01)


def test_a_corrupt_settings_file_keeps_the_last_good_settings(agent: InProcessAgent):
    agent.settings_file.write_text("idle_after = 'soon'\n")
    status = wait_for(
        lambda: (s := agent.client.status()).settings_error and s,
        15,
        "the settings error to be reported",
    )
    assert "idle_after" in status.settings_error
    settings, _ = agent.client.settings()
    assert settings.idle_after == timedelta(seconds=1)  # the last good value


def test_the_socket_is_private_and_a_second_agent_is_refused(agent: InProcessAgent):
    assert agent.socket.stat().st_mode & 0o777 == 0o600
    with pytest.raises(AgentAlreadyRunning):
        LocalApiServer(agent.engine, None, agent.socket).start()
    assert agent.client.status().guests  # the first agent still serves


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")
def test_another_user_cannot_call_the_agent(agent: InProcessAgent):
    nobody = pwd.getpwnam("nobody")
    agent.socket.parent.chmod(0o755)  # even with the directory open, the socket refuses
    code = (
        "import socket, sys\n"
        "s = socket.socket(socket.AF_UNIX)\n"
        "try:\n"
        f"    s.connect({str(agent.socket)!r})\n"
        "except PermissionError:\n"
        "    sys.exit(13)\n"
        "sys.exit(0)\n"
    )
    result = subprocess.run(
        # The venv lives under /root, which nobody cannot read: use the system Python.
        ["/usr/bin/python3", "-c", code],
        user=nobody.pw_uid,
        group=nobody.pw_gid,
        check=False,
        timeout=30,
    )
    assert result.returncode == 13, "user nobody could connect to the agent's socket"


# --- many clients at once -------------------------------------------------------------


class _Watcher:
    """One tray's status stream, followed on its own thread; keeps what it saw."""

    def __init__(self, socket: Path) -> None:
        self.client = AgentClient(socket)
        self.seen: list[AgentStatus] = []
        self._lock = threading.Lock()
        self.thread = threading.Thread(target=self._follow, daemon=True)
        self.thread.start()

    def _follow(self) -> None:
        try:
            for status in self.client.watch():
                with self._lock:
                    self.seen.append(status)
        except AgentUnavailable:
            return  # closed by the test, or refused: `seen` says which

    def saw(self, wanted: Callable[[AgentStatus], bool]) -> bool:
        with self._lock:
            return any(wanted(status) for status in self.seen)

    def close(self) -> None:
        self.client.close()
        self.thread.join(5)


@contextmanager
def _watchers(socket: Path, count: int) -> Iterator[list[_Watcher]]:
    with ExitStack() as stack:
        watchers = []
        for _ in range(count):
            watcher = _Watcher(socket)
            stack.callback(watcher.close)
            watchers.append(watcher)
        yield watchers


def _served(watchers: list[_Watcher]) -> int:
    return sum(1 for w in watchers if w.saw(lambda _: True))


def test_calls_answer_at_once_while_fifty_status_streams_are_open(agent: InProcessAgent):
    quick = AgentClient(agent.socket, timeout_s=2.0)
    with quick, _watchers(agent.socket, 50) as watchers:
        # At least as many streams as the old server had worker threads are being served.
        wait_for(lambda: _served(watchers) >= 8, 10, "the first streams to be served")
        quick.report_activity(datetime.now().astimezone(), events=1)
        settings, _ = quick.settings()
        assert settings.idle_after == timedelta(seconds=1)
        assert quick.snooze(datetime.now().astimezone() + timedelta(hours=1)).snoozed_until
        assert quick.resume().snoozed_until is None


def test_fifty_status_streams_all_get_every_change(agent: InProcessAgent):
    with _watchers(agent.socket, 50) as watchers:
        wait_for(lambda: _served(watchers) == 50, 10, "all 50 streams to get a first snapshot")
        agent.client.snooze(None)
        wait_for(
            lambda: all(w.saw(lambda s: s.snoozed_indefinitely) for w in watchers),
            5,
            "all 50 streams to see the snooze",
        )
        agent.client.resume()
        wait_for(
            lambda: all(w.seen[-1].decision.cause is not Cause.SNOOZED for w in watchers),
            5,
            "all 50 streams to see donating resumed",
        )


@pytest.fixture
def capped(agent: InProcessAgent) -> Iterator[LocalApiServer]:
    """A second local API on the same engine that takes at most 4 status streams."""
    server = LocalApiServer(
        agent.engine, agent.history, agent.root / "run" / "capped.sock", max_streams=4
    )
    server.start()
    try:
        yield server
    finally:
        server.stop(grace_s=0)


def test_streams_past_the_cap_are_refused_and_calls_still_answer(
    agent: InProcessAgent, capped: LocalApiServer
):
    with _watchers(capped.socket_path, 4) as watchers:
        wait_for(lambda: _served(watchers) == 4, 10, "the first 4 streams to be served")
        with grpc.insecure_channel(f"unix:{capped.socket_path}") as channel:
            stub = pb_grpc.AgentStub(channel)
            with pytest.raises(grpc.RpcError) as caught:
                next(iter(stub.WatchStatus(pb.WatchStatusRequest(), timeout=5)))
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "WatchStatus: 4 streams open" in caught.value.details()
        with AgentClient(capped.socket_path, timeout_s=2.0) as quick:
            quick.report_activity(datetime.now().astimezone(), events=1)
            assert quick.settings()[0].idle_after == timedelta(seconds=1)
            watchers[0].close()

            def status_if_served() -> AgentStatus | None:
                try:
                    return quick.status()
                except AgentUnavailable:  # refused until the closed stream is gone
                    return None

            # A closed stream's place is free again.
            assert wait_for(status_if_served, 5, "a new stream to be served").guests


def test_a_stuck_engine_holds_back_only_the_calls_that_need_it(agent: InProcessAgent):
    release = threading.Event()
    agent.engine.submit(lambda: release.wait(30))  # the engine is busy until released
    with grpc.insecure_channel(f"unix:{agent.socket}") as channel:
        stub = pb_grpc.AgentStub(channel)
        try:
            calls = [
                stub.GetSettings.future(pb.GetSettingsRequest(), timeout=20) for _ in range(40)
            ]

            def refused() -> list[grpc.Future]:
                return [c for c in calls if c.done() and c.exception() is not None]

            # Past MAX_WAITING_CALLS (32), calls are refused at once instead of piling up.
            wait_for(lambda: len(refused()) == 8, 10, "8 calls to be refused")
            for call in refused():
                assert call.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "GetSettings: 32 calls already waiting" in call.details()
            # The owner's return waits for nothing.
            with AgentClient(agent.socket, timeout_s=2.0) as quick:
                quick.report_activity(datetime.now().astimezone(), events=1)
        finally:
            release.set()
        answered = [c for c in calls if c.exception() is None]
        assert len(answered) == 32
        assert all(c.result().toml for c in answered)


def _moves(n: int) -> tuple[GuestMove, ...]:
    """A distinct, large change (about 100 KiB on the wire): a few of them fill a stream's
    flow-control window, so the agent holds what a client does not read."""
    at = datetime(2026, 1, 1, tzinfo=UTC) + timedelta(seconds=n)
    return tuple(GuestMove(at, f"w-{n:08x}-{i}", "started", detail="x" * 2000) for i in range(50))


def test_streams_nobody_reads_hold_only_the_latest_snapshot(agent: InProcessAgent):
    api = agent.api
    assert api is not None
    channel = grpc.insecure_channel(f"unix:{agent.socket}")
    stub = pb_grpc.AgentStub(channel)
    # Opened and never read: the client takes no message off these streams.
    unread = [stub.WatchStatus(pb.WatchStatusRequest()) for _ in range(20)]
    reader = agent.client.watch()
    try:
        assert next(reader)  # the reader's stream is open
        wait_for(lambda: len(api.stream_backlogs()) == 21, 10, "21 streams to be open")
        for n in range(60):
            agent.engine.set_moves(_moves(n))
            # Published to every stream before the next change: the reader has it.
            assert next(s for s in reader if s.moves == _moves(n))
        backlogs = api.stream_backlogs()
        assert len(backlogs) == 21
        assert max(backlogs) <= 1, f"snapshots waiting per stream: {backlogs}"
        # A stream that starts reading now gets the newest snapshot; the agent answers.
        assert agent.client.status().moves == _moves(59)
        agent.client.report_activity(datetime.now().astimezone(), events=1)
    finally:
        for stream in unread:
            stream.cancel()
        channel.close()


# --- timestamps out of protobuf's range -----------------------------------------------

LAST_SECOND = 253_402_300_799  # 9999-12-31T23:59:59Z
FIRST_SECOND = -62_135_596_800  # 0001-01-01T00:00:00Z
HOUR = timedelta(hours=1)


def _stamp(seconds: int, nanos: int = 0) -> Timestamp:
    return Timestamp(seconds=seconds, nanos=nanos)


def _now_stamp() -> Timestamp:
    return serde.timestamp(datetime.now().astimezone())


@pytest.mark.parametrize(
    ("rpc", "request_", "field"),
    [
        pytest.param(
            "ReportActivity",
            pb.ActivityReport(last_input=_stamp(LAST_SECOND + 1)),
            "last_input",
            id="report-after-9999",
        ),
        pytest.param(
            "ReportActivity",
            pb.ActivityReport(last_input=_stamp(0, -1)),
            "last_input",
            id="report-negative-nanos",
        ),
        pytest.param(
            "ReportActivity",
            pb.ActivityReport(last_input=_stamp(-(2**62))),
            "last_input",
            id="report-far-past",
        ),
        pytest.param(
            "Snooze", pb.SnoozeRequest(until=_stamp(2**62)), "until", id="snooze-far-future"
        ),
        pytest.param(
            "Snooze",
            pb.SnoozeRequest(until=_stamp(1_900_000_000, 10**9)),
            "until",
            id="snooze-nanos-a-second",
        ),
        pytest.param(
            "GetHistory",
            pb.HistoryRequest(start=_stamp(FIRST_SECOND - 1), end=_now_stamp()),
            "start",
            id="history-start-before-year-1",
        ),
        pytest.param(
            "GetHistory",
            pb.HistoryRequest(start=_now_stamp(), end=_stamp(LAST_SECOND + 1)),
            "end",
            id="history-end-after-9999",
        ),
        pytest.param(
            "GetHistory",
            pb.HistoryRequest(start=_now_stamp(), end=_stamp(0, 2**31 - 1)),
            "end",
            id="history-end-nanos-too-large",
        ),
    ],
)
def test_an_out_of_range_timestamp_is_refused_naming_its_field(
    agent: InProcessAgent, rpc: str, request_: object, field: str
):
    with grpc.insecure_channel(f"unix:{agent.socket}") as channel:
        call = getattr(pb_grpc.AgentStub(channel), rpc)
        with pytest.raises(grpc.RpcError) as caught:
            call(request_, timeout=5)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
        assert caught.value.details().startswith(f"{field}: ")
        # The agent is unharmed.
        assert pb_grpc.AgentStub(channel).GetSettings(pb.GetSettingsRequest(), timeout=5).toml


def test_history_at_the_ends_of_time_is_answered(agent: InProcessAgent):
    last = datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC)
    buckets, totals = agent.client.history(last - timedelta(days=1), last)
    assert len(buckets) == 25
    assert buckets[-1].start == datetime(9999, 12, 31, 23, tzinfo=UTC)
    first = datetime(1, 1, 1, tzinfo=UTC)
    buckets, totals = agent.client.history(first, first + timedelta(days=1))
    assert [b.start for b in buckets[:2]] == [first, first + HOUR]
    assert totals.cpu_hours == 0


def test_a_history_span_longer_than_the_agent_keeps_is_refused(agent: InProcessAgent):
    now = datetime.now().astimezone()
    with pytest.raises(AgentRefused, match="^end: "):
        agent.client.history(now - timedelta(days=399), now)


def test_input_reported_from_year_one_is_taken_and_changes_nothing(agent: InProcessAgent):
    wait_for(lambda: agent.engine.level is Level.RUN, 10, "the engine to decide RUN")
    agent.client.report_activity(datetime(1, 1, 1, tzinfo=UTC), events=1)
    assert agent.client.status().decision.level is Level.RUN
