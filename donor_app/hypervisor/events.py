"""libvirt lifecycle events, handed on through a queue from libvirt's event-loop thread.

libvirt's event loop is process-wide by libvirt's own design: it must be registered once,
before the first connection is opened (the embedded QEMU driver needs it too), and run on
one thread. `ensure_event_loop()` does that exactly once. The callbacks only build a small
value and put it on a queue: nothing that can block runs on the loop thread.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import libvirt

log = logging.getLogger(__name__)

EVENT_KINDS = {
    libvirt.VIR_DOMAIN_EVENT_DEFINED: "defined",
    libvirt.VIR_DOMAIN_EVENT_UNDEFINED: "undefined",
    libvirt.VIR_DOMAIN_EVENT_STARTED: "started",
    libvirt.VIR_DOMAIN_EVENT_SUSPENDED: "suspended",
    libvirt.VIR_DOMAIN_EVENT_RESUMED: "resumed",
    libvirt.VIR_DOMAIN_EVENT_STOPPED: "stopped",
    libvirt.VIR_DOMAIN_EVENT_SHUTDOWN: "shutdown",
    libvirt.VIR_DOMAIN_EVENT_PMSUSPENDED: "pmsuspended",
    libvirt.VIR_DOMAIN_EVENT_CRASHED: "crashed",
}


@dataclass(frozen=True, slots=True)
class LifecycleEvent:
    """A guest changed state. `detail` is libvirt's detail code for the kind."""

    guest: str
    kind: str
    detail: int
    monotonic: float


class _EventLoop:
    """Holder for the one libvirt event loop of this process (see module docstring)."""

    lock = threading.Lock()
    thread: threading.Thread | None = None

    @classmethod
    def ensure(cls) -> None:
        with cls.lock:
            if cls.thread is not None:
                return
            libvirt.virEventRegisterDefaultImpl()
            cls.thread = threading.Thread(target=cls._run, name="libvirt-events", daemon=True)
            cls.thread.start()

    @staticmethod
    def _run() -> None:
        while True:
            try:
                libvirt.virEventRunDefaultImpl()
            except libvirt.libvirtError:
                log.exception("libvirt event loop iteration failed")


def ensure_event_loop() -> None:
    """Register and start libvirt's default event loop once per process."""
    _EventLoop.ensure()


class LifecycleEvents:
    """Subscribes to one connection's lifecycle events; consumers read `queue`.

    `to_guest` maps a libvirt domain name to the project's guest name, or None for domains
    that are not ours (those events are dropped). `muted` says whether an event for a guest
    should be dropped right now (the duty-cycle CPU cap suspends and resumes a guest ten
    times a second; those are not state changes anyone should hear about). Both are
    called on the event-loop thread and must not block.
    """

    def __init__(
        self,
        conn: Any,
        to_guest: Callable[[str], str | None],
        muted: Callable[[str, str], bool],
        maxsize: int = 10_000,
    ) -> None:
        self.queue: queue.Queue[LifecycleEvent] = queue.Queue(maxsize=maxsize)
        self._to_guest = to_guest
        self._muted = muted
        self._conn = conn
        self._callback_id: int = conn.domainEventRegisterAny(
            None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_event, None
        )

    def _on_event(self, _conn: Any, dom: Any, event: int, detail: int, _opaque: Any) -> None:
        guest = self._to_guest(dom.name())
        kind = EVENT_KINDS.get(event, f"event-{event}")
        if guest is None or self._muted(guest, kind):
            return
        try:
            self.queue.put_nowait(LifecycleEvent(guest, kind, detail, time.monotonic()))
        except queue.Full:
            log.warning("lifecycle event queue full; dropped %s %s", guest, kind)

    def close(self) -> None:
        try:
            self._conn.domainEventDeregisterAny(self._callback_id)
        except libvirt.libvirtError:
            log.debug("deregistering lifecycle events failed", exc_info=True)
