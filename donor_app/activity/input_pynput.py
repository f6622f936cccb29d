"""Keyboard and pointer input through pynput: event-driven, timestamps and counts only.

pynput is imported lazily by `load_pynput()`: on Linux its import opens the X display
and raises (ImportError without DISPLAY, an Xlib error for an unreachable one), so the
factory calls it inside a try and falls back to the Null listener.

Privacy (docs/design.md, "Security"): the handlers take pynput's arguments (key, position,
button, scroll vector) and drop them unread; the listener keeps the monotonic time of
the last event and a count, nothing else.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from donor_app.activity.ports import OnInput

logger = logging.getLogger(__name__)

MOVE_INTERVAL_S = 0.05
"""Pointer moves and scrolls notify at most once per this window: a moving mouse emits
hundreds of events a second and the first one already told the agent."""

READY_TIMEOUT_S = 2.0
"""How long `start` waits for pynput to install its hooks before it gives up waiting."""

STOP_TIMEOUT_S = 2.0


class BackendListener(Protocol):
    """The part of a `pynput.keyboard.Listener` / `pynput.mouse.Listener` used here.

    They are `threading.Thread`s; `wait` blocks until the OS hook is installed.
    """

    def start(self) -> None: ...
    def stop(self) -> None: ...
    def wait(self) -> None: ...
    def is_alive(self) -> bool: ...
    def join(self, timeout: float | None = None) -> None: ...


@dataclass(frozen=True, slots=True)
class Handlers:
    """The callbacks handed to pynput's listeners (they accept and drop any arguments)."""

    on_press: Callable[..., None]
    on_release: Callable[..., None]
    on_move: Callable[..., None]
    on_click: Callable[..., None]
    on_scroll: Callable[..., None]


ListenerFactory = Callable[[Handlers], Sequence[BackendListener]]
"""Builds fresh (unstarted) backend listeners; pynput's cannot be restarted."""


class _PynputListener:
    """A pynput listener whose stop() takes effect at once on X11.

    pynput's X11 backend queues RecordDisableContext on the connection its thread is
    blocked reading, without flushing it, so the thread ends only at the next input
    event (https://github.com/moses-palmer/pynput/pull/583, open as of pynput 1.8.2).
    Sending the request on its second connection, as that PR does, ends it in ~1 ms.
    """

    def __init__(self, listener: Any) -> None:
        self._listener = listener

    def start(self) -> None:
        self._listener.start()

    def wait(self) -> None:
        self._listener.wait()

    def is_alive(self) -> bool:
        return bool(self._listener.is_alive())

    def join(self, timeout: float | None = None) -> None:
        self._listener.join(timeout)

    def stop(self) -> None:
        self._listener.stop()
        # Private attributes of pynput's xorg backend; absent on other backends.
        display = getattr(self._listener, "_display_stop", None)
        context = getattr(self._listener, "_context", None)
        if display is None or context is None:
            return
        try:
            display.record_disable_context(context)
            display.flush()
        except Exception:
            # Worst case the thread ends at the next input event, as without this.
            logger.debug("could not flush the X11 record context", exc_info=True)


def load_pynput() -> ListenerFactory:
    """Import pynput and return a factory of its keyboard and mouse listeners.

    Raises whatever pynput's import raises where it cannot work (ImportError with no
    DISPLAY, Xlib.error.DisplayConnectionError for an unreachable display, ...).
    """
    import pynput.keyboard  # noqa: PLC0415  (lazy: importing it opens the display)
    import pynput.mouse  # noqa: PLC0415

    def make(handlers: Handlers) -> Sequence[BackendListener]:
        keyboard = pynput.keyboard.Listener(
            on_press=handlers.on_press, on_release=handlers.on_release
        )
        mouse = pynput.mouse.Listener(
            on_move=handlers.on_move, on_click=handlers.on_click, on_scroll=handlers.on_scroll
        )
        return [_PynputListener(keyboard), _PynputListener(mouse)]

    return make


class PynputInputListener:
    """Input listener on pynput's keyboard and mouse hooks (see `ports.InputListener`).

    Key presses and button presses/releases call `on_input` immediately; moves and
    scrolls call it at most once per `move_interval_s` (the first one at once); key
    releases only count, since their press already notified. `on_input` runs on
    pynput's listener threads and must not block. An exception it raises is logged and
    swallowed, because pynput would otherwise stop listening.
    """

    def __init__(
        self,
        backend: ListenerFactory,
        *,
        monotonic: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        move_interval_s: float = MOVE_INTERVAL_S,
        ready_timeout_s: float = READY_TIMEOUT_S,
    ) -> None:
        self._backend = backend
        self._monotonic = monotonic
        self._wall_clock = wall_clock
        self._move_interval_s = move_interval_s
        self._ready_timeout_s = ready_timeout_s
        # One lock guards the three numbers below: pynput calls us from two threads
        # (keyboard and mouse), and `+=` is not atomic.
        self._lock = threading.Lock()
        self._last_event: float | None = None  # monotonic seconds
        self._events = 0
        self._last_notify = float("-inf")  # monotonic seconds
        self._on_input: OnInput | None = None
        self._listeners: Sequence[BackendListener] = ()

    def start(self, on_input: OnInput) -> None:
        """Install the hooks and wait (bounded) until they are live.

        Called by the owning thread; blocks at most about `ready_timeout_s`. A backend
        that fails to start is logged and then reports nothing, like the Null listener.
        """
        if self._listeners:
            raise RuntimeError("input listener already started")
        self._on_input = on_input
        handlers = Handlers(
            on_press=self._on_notifying_event,
            on_release=self._on_counted_event,
            on_move=self._on_flooding_event,
            on_click=self._on_notifying_event,
            on_scroll=self._on_flooding_event,
        )
        started: list[BackendListener] = []
        try:
            for listener in self._backend(handlers):
                listener.start()
                started.append(listener)
        except Exception:
            logger.exception("input listener failed to start; no input events will be seen")
            self._listeners = started
            self.stop()  # the ones that did start (e.g. the keyboard but not the mouse)
            return
        self._listeners = started
        for listener in started:
            self._wait_ready(listener)

    def stop(self) -> None:
        """Remove the hooks; no callback is made after this returns. Idempotent."""
        self._on_input = None
        listeners, self._listeners = self._listeners, ()
        for listener in listeners:
            # pynput's stop() waits for readiness when the hook was never installed,
            # forever if its thread died first: only stop a listener that still runs.
            if listener.is_alive():
                listener.stop()
        for listener in listeners:
            try:
                listener.join(STOP_TIMEOUT_S)
            except Exception:
                # join() re-raises what killed the listener's thread; it is gone either way.
                logger.warning("input listener thread had failed", exc_info=True)

    def last_input(self) -> datetime | None:
        """Wall-clock time of the newest event, derived from the monotonic clock."""
        with self._lock:
            last = self._last_event
        if last is None:
            return None
        # Stored as monotonic time so that a wall-clock jump does not fake idleness.
        return self._wall_clock() - timedelta(seconds=max(0.0, self._monotonic() - last))

    def event_count(self) -> int:
        """Events seen so far (presses, releases, clicks, moves and scrolls)."""
        with self._lock:
            return self._events

    def _wait_ready(self, listener: BackendListener) -> None:
        # pynput's wait() has no timeout and never returns if the listener's thread dies
        # before installing its hook, so wait on a helper thread with a deadline.
        ready = threading.Event()

        def wait() -> None:
            listener.wait()
            ready.set()

        threading.Thread(target=wait, name="pynput-ready", daemon=True).start()
        if not ready.wait(self._ready_timeout_s):
            state = "alive" if listener.is_alive() else "dead"
            logger.warning(
                "input listener not ready after %.1f s (thread %s)", self._ready_timeout_s, state
            )

    # The handlers below run on pynput's threads. Their arguments (key, position,
    # button, scroll vector, injected flag) are accepted and dropped unread.

    def _on_counted_event(self, *_event: object) -> None:
        self._record(flood=False, notify=False)

    def _on_notifying_event(self, *_event: object) -> None:
        if self._record(flood=False, notify=True):
            self._notify()

    def _on_flooding_event(self, *_event: object) -> None:
        if self._record(flood=True, notify=True):
            self._notify()

    def _record(self, *, flood: bool, notify: bool) -> bool:
        """Count the event; return whether to call `on_input` for it."""
        now = self._monotonic()
        with self._lock:
            self._last_event = now
            self._events += 1
            if not notify or (flood and now - self._last_notify < self._move_interval_s):
                return False
            self._last_notify = now
            return True

    def _notify(self) -> None:
        on_input = self._on_input
        if on_input is None:
            return
        try:
            on_input()
        except Exception:
            logger.exception("on_input callback failed")
