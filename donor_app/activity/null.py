"""Null sensors: what the factory hands out when a platform offers no usable source.

They report "unknown" rather than inventing activity, so the policy decides on the
sensors that do work (e.g. the idle counter when no input listener can run).
"""

from __future__ import annotations

import os
from datetime import datetime

from donor_app.activity.ports import OnInput
from donor_app.domain.readings import HostReading


class NullInputListener:
    """An input listener that never sees input (no display, no permission, no pynput)."""

    def start(self, on_input: OnInput) -> None:
        """Do nothing: there is no input source to listen to."""

    def stop(self) -> None:
        """Do nothing."""

    def last_input(self) -> datetime | None:
        """Always None: no input was ever seen."""
        return None

    def event_count(self) -> int:
        """Always 0."""
        return 0


class NullIdleCounter:
    """An idle counter for platforms without a native one: the idle time is unknown."""

    def seconds_since_last_input(self) -> float | None:
        """Always None (unknown)."""
        return None

    def close(self) -> None:
        """Do nothing."""


class NullHostSensor:
    """A host sensor that knows only the core count.

    The owner's CPU load reads as 0 % (unknown, so the decision rests on input activity)
    and the memory as 0 MiB (unknown, so nothing is lent on its strength).
    """

    def read(self) -> HostReading:
        """Return a reading with unknown load, memory, battery and temperature."""
        return HostReading(
            owner_cpu_percent=0.0,
            total_memory_mib=0,
            cpu_count=os.cpu_count() or 1,
        )
