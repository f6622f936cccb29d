"""Follows the agent's status stream on a background thread, reconnecting with backoff.

Qt-free: the tray passes callbacks that emit Qt signals, so the snapshots reach the GUI
thread through queued connections (the callbacks run on this module's thread).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path

from donor_app.agent.local_client import AgentClient, AgentUnavailable
from donor_app.domain.status import AgentStatus
from donor_app.gui.backoff import Backoff

log = logging.getLogger(__name__)


def agent_client_factory(socket: Path) -> Callable[[], AgentClient]:
    """A fresh client per connection attempt: a gRPC channel that failed backs off on its
    own (up to minutes), which would delay noticing that the agent is back."""
    return lambda: AgentClient(socket)


class StatusWatcher:
    """Calls `on_status(snapshot)` for each snapshot and `on_lost(reason)` once each time
    the agent stops answering; retries with `backoff`, never busy-looping.

    Both callbacks run on the watcher's thread and must not block.
    """

    def __init__(
        self,
        connect: Callable[[], AgentClient],
        on_status: Callable[[AgentStatus], None],
        on_lost: Callable[[str], None],
        backoff: Backoff | None = None,
    ) -> None:
        self._connect = connect
        self._on_status = on_status
        self._on_lost = on_lost
        self._backoff = backoff or Backoff()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._client: AgentClient | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("the status watcher is already running")
        self._thread = threading.Thread(target=self._run, name="status-watcher", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop and join; closing the client cancels a stream blocked on the agent."""
        self._stop.set()
        with self._lock:
            if self._client is not None:
                self._client.close()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def _run(self) -> None:
        # Report the first failure, then only the first one after each success.
        report = True
        while not self._stop.is_set():
            reason, received = self._follow_once()
            if self._stop.is_set():
                return
            if report or received:
                log.info("agent connection lost: %s", reason)
                self._on_lost(reason)
            report = False
            delay = self._backoff.next_delay()
            log.debug("reconnecting to the agent in %.1f s", delay)
            self._stop.wait(delay)

    def _follow_once(self) -> tuple[str, bool]:
        """Follow one stream until it ends: why it ended, and whether it gave anything."""
        client = self._connect()
        with self._lock:
            if self._stop.is_set():
                client.close()
                return "stopping", False
            self._client = client
        received = False
        try:
            for status in client.watch():
                received = True
                self._backoff.reset()
                self._on_status(status)
            return "the agent closed the connection", received
        except AgentUnavailable as exc:
            return str(exc), received
        except ValueError as exc:
            # A snapshot this tray cannot read (a newer agent): say so, keep retrying.
            log.warning("unreadable status from the agent: %s", exc)
            return f"unreadable status from the agent: {exc}", received
        finally:
            with self._lock:
                self._client = None
            client.close()
