"""The seams between the activity sensors and their users (the tray and the agent).

Each Protocol's docstring says which thread calls it and whether it may block, because
the input path is the critical path for giving the machine back to its owner
(docs/design.md, "The critical path"): anything called on a listener's thread must be
cheap.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Protocol

from donor_app.domain.readings import HostReading

OnInput = Callable[[], None]
"""Called on each input event (coalesced for pointer-move floods); takes no arguments
so that no key, button or position can ever reach the caller."""


class InputListener(Protocol):
    """Event-driven listener for the owner's keyboard and pointer input.

    Threads: `start` and `stop` are called by the owning thread (the tray's main thread)
    and may block briefly (`start` waits until the OS hook is installed, bounded by a
    timeout). The `on_input` callback is invoked on the listener's own thread(s), once
    per key or button press and at most once per short window for pointer moves and
    scrolls; it must not block (hand the event on, e.g. set an Event or post to a queue).
    `last_input` and `event_count` are thread-safe, never block and may be called from
    any thread.

    Privacy: implementations keep the time of the last event and a count only, never
    key codes, keys, buttons or pointer positions.
    """

    def start(self, on_input: OnInput) -> None:
        """Start listening; `on_input` is called on the listener's thread per event.

        Never raises for an unusable input source: it logs and reports nothing instead.
        Raises RuntimeError when already started.
        """
        ...

    def stop(self) -> None:
        """Stop listening; no callback is made after it returns. Idempotent."""
        ...

    def last_input(self) -> datetime | None:
        """When the newest input event was seen (timezone-aware), None if none yet."""
        ...

    def event_count(self) -> int:
        """How many input events were seen since construction (all kinds together)."""
        ...


class IdleCounter(Protocol):
    """The OS's own idle counter (seconds since the last input on this seat/display).

    Threads: polled by one thread at a time (the agent's engine loop); implementations
    are not required to be thread-safe. A call does not block for long: a few
    microseconds for in-process queries (X11, Windows, macOS), a few milliseconds and at
    most a short timeout for the ones that spawn a helper (logind through `busctl`).
    """

    def seconds_since_last_input(self) -> float | None:
        """Seconds since the newest input, or None when it cannot be known right now.

        Never raises: a failed query is logged (once per outage) and answered with None.
        """
        ...

    def close(self) -> None:
        """Release OS resources (e.g. an X display connection). Idempotent."""
        ...


class HostSensor(Protocol):
    """The host's own load, battery and temperature, excluding what the guests use.

    Threads: called by one thread at a time (the agent's engine loop), typically once a
    second; not thread-safe. A call reads /proc (or the OS's equivalent) and may take up
    to about a millisecond, but never waits on anything else.
    """

    def read(self) -> HostReading:
        """Measure now; CPU figures are averages since the previous call (or creation)."""
        ...
