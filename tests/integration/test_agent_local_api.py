"""The agent through its real local API: engine + real libvirt (test:/// driver) + gRPC.

The real QEMU path (and real input under Xvfb) is in tests/e2e/test_agent_e2e.py.
"""

from __future__ import annotations

import itertools
import os
import pwd
import subprocess
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import grpc
import pytest

from donor_app.agent.link.journal import MoveJournal
from donor_app.agent.local_api import AgentAlreadyRunning, LocalApiServer
from donor_app.agent.local_client import AgentRefused
from donor_app.domain.decision import Cause, Level
from donor_app.domain.guest import GuestState
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
