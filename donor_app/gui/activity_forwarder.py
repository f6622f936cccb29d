"""Forwards the owner's input activity to the agent (ReportActivity), batched.

The first input after a quiet spell is sent at once: it is on the critical path of
giving the machine back (docs/design.md). Input during the next `interval_s` is folded into
one report (the newest time and a count, never keys), so a typing owner costs at most
one small RPC per interval. Qt-free; runs its own thread.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import datetime
from typing import Protocol

from donor_app.activity.ports import InputListener
from donor_app.agent.local_client import AgentRefused, AgentUnavailable

log = logging.getLogger(__name__)


class ActivitySink(Protocol):
    """Where reports go (an `AgentClient`). Called on the forwarder's thread; may block
    up to the client's timeout."""

    def report_activity(self, last_input: datetime, events: int) -> None: ...
    def close(self) -> None: ...


class ActivityForwarder:
    """Runs `listener` and reports its input through clients made by `connect`."""

    def __init__(
        self,
        listener: InputListener,
        connect: Callable[[], ActivitySink],
        interval_s: float = 1.0,
    ) -> None:
        self._listener = listener
        self._connect = connect
        self._interval = interval_s
        self._input = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sink: ActivitySink | None = None
        self._reported_count = 0
        self.reports_sent = 0
        """How many reports reached the agent (read by the tray's About and tests)."""

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("the activity forwarder is already running")
        self._reported_count = self._listener.event_count()
        self._listener.start(self._input.set)
        self._thread = threading.Thread(target=self._run, name="activity-forwarder", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        self._listener.stop()
        self._stop.set()
        self._input.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
        if self._sink is not None:
            self._sink.close()
            self._sink = None

    def _run(self) -> None:
        while True:
            self._input.wait()
            if self._stop.is_set():
                return
            self._input.clear()
            self._send()
            # Coalesce what comes in during the interval into the next report.
            if self._stop.wait(self._interval):
                return

    def _send(self) -> None:
        last_input = self._listener.last_input()
        count = self._listener.event_count()
        events, self._reported_count = count - self._reported_count, count
        if last_input is None or events <= 0:
            return
        try:
            if self._sink is None:
                self._sink = self._connect()
            self._sink.report_activity(last_input, min(events, 2**32 - 1))
            self.reports_sent += 1
        except AgentUnavailable as exc:
            # The status watcher shows the outage; input is not queued for later: by the
            # time the agent is back it is stale, and the agent watches the idle counter.
            log.debug("activity not reported: %s", exc)
            if self._sink is not None:
                self._sink.close()
                self._sink = None
        except AgentRefused as exc:
            log.warning("the agent refused an activity report: %s", exc)
