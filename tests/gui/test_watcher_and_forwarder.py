"""The status watcher and the activity forwarder (Qt-free threads) against a real agent."""

from __future__ import annotations

import threading
from datetime import datetime

from donor_app.activity.ports import OnInput
from donor_app.agent.local_client import AgentClient
from donor_app.domain.decision import Cause, Level
from donor_app.domain.status import AgentStatus
from donor_app.gui.activity_forwarder import ActivityForwarder
from donor_app.gui.backoff import Backoff
from donor_app.gui.status_watcher import StatusWatcher, agent_client_factory
from tests.agent_in_process import InProcessAgent
from tests.waiting import wait_for


class Recorder:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.statuses: list[AgentStatus] = []
        self.lost: list[str] = []

    def status(self, status: AgentStatus) -> None:
        with self.lock:
            self.statuses.append(status)

    def lose(self, reason: str) -> None:
        with self.lock:
            self.lost.append(reason)


class CountingConnect:
    """A real client factory that counts connection attempts."""

    def __init__(self, agent: InProcessAgent) -> None:
        self._make = agent_client_factory(agent.socket)
        self.attempts = 0

    def __call__(self) -> AgentClient:
        self.attempts += 1
        return self._make()


def test_watcher_follows_loses_and_regains_the_agent(agent: InProcessAgent) -> None:
    record = Recorder()
    connect = CountingConnect(agent)
    watcher = StatusWatcher(
        connect,
        record.status,
        record.lose,
        Backoff(initial_s=0.1, maximum_s=0.5),
    )
    watcher.start()
    try:
        wait_for(lambda: len(record.statuses) >= 2, 10, "two snapshots")
        assert record.lost == []
        agent.stop_api()
        wait_for(lambda: record.lost, 10, "the loss to be reported")
        seen, attempts = len(record.statuses), connect.attempts
        # Retrying while the agent is away reports the loss once, not per attempt.
        wait_for(lambda: connect.attempts >= attempts + 3, 10, "three more attempts")
        assert len(record.lost) == 1
        agent.start_api()
        wait_for(lambda: len(record.statuses) > seen, 10, "snapshots again")
        agent.stop_api()
        wait_for(lambda: len(record.lost) == 2, 10, "the second loss to be reported")
    finally:
        watcher.stop()


def test_watcher_without_an_agent_reports_once_and_stops_promptly(agent: InProcessAgent) -> None:
    record = Recorder()
    agent.stop_api()
    watcher = StatusWatcher(agent_client_factory(agent.socket), record.status, record.lose)
    watcher.start()
    wait_for(lambda: record.lost, 5, "the loss to be reported")
    stopped = threading.Thread(target=watcher.stop)
    stopped.start()
    stopped.join(3)
    assert not stopped.is_alive(), "stop() waited for the backoff"
    assert record.statuses == []


class ScriptedInput:
    """Implements the InputListener port; the test presses "keys" (counts only)."""

    def __init__(self) -> None:
        self._on_input: OnInput | None = None
        self._count = 0
        self._last: datetime | None = None
        self.stopped = False

    def start(self, on_input: OnInput) -> None:
        self._on_input = on_input

    def stop(self) -> None:
        self.stopped = True

    def last_input(self) -> datetime | None:
        return self._last

    def event_count(self) -> int:
        return self._count

    def press(self, times: int = 1) -> None:
        for _ in range(times):
            self._count += 1
            self._last = datetime.now().astimezone()
            assert self._on_input is not None
            self._on_input()


class CountedReports:
    """A real client that also notes how many input events each report carried."""

    def __init__(self, agent: InProcessAgent) -> None:
        self._client = AgentClient(agent.socket)
        self.events: list[int] = []

    def report_activity(self, last_input: datetime, events: int) -> None:
        self._client.report_activity(last_input, events)
        self.events.append(events)

    def close(self) -> None:
        self._client.close()


def test_input_reaches_the_agent_at_once_and_bursts_are_batched(agent: InProcessAgent) -> None:
    wait_for(lambda: agent.engine.level is Level.RUN, 10, "the agent to donate")
    keys = ScriptedInput()
    reports = CountedReports(agent)
    forwarder = ActivityForwarder(keys, lambda: reports, interval_s=1.0)
    forwarder.start()
    try:
        keys.press()
        wait_for(lambda: agent.engine.level is Level.PAUSED, 2, "the agent to pause")
        assert agent.client.status().decision.cause is Cause.OWNER_ACTIVE
        assert reports.events == [1]
        keys.press(200)  # typing: folded into one report after the interval
        wait_for(lambda: len(reports.events) >= 2, 5, "the batched report")
        assert reports.events == [1, 200]
        assert forwarder.reports_sent == 2
    finally:
        forwarder.stop()
    assert keys.stopped


def test_forwarding_survives_the_agent_going_away(agent: InProcessAgent) -> None:
    keys = ScriptedInput()
    connect = CountingConnect(agent)
    forwarder = ActivityForwarder(keys, connect, interval_s=0.05)
    forwarder.start()
    try:
        agent.stop_api()
        keys.press()
        wait_for(lambda: connect.attempts == 1, 2, "a report attempt")
        assert forwarder.reports_sent == 0
        agent.start_api()
        wait_for(lambda: agent.engine.level is Level.RUN, 10, "the agent to donate")
        keys.press()
        wait_for(lambda: forwarder.reports_sent == 1, 5, "a report after the agent is back")
        wait_for(lambda: agent.engine.level is Level.PAUSED, 2, "the agent to pause")
    finally:
        forwarder.stop()
