"""What the sensors saw, as the policy consumes it.

The activity package produces these; `policy.decide()` reads them. All times are
timezone-aware datetimes so that schedules (local wall-clock windows) and sensor
timestamps compare without conversions inside the policy.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime


@dataclass(frozen=True, slots=True)
class ActivityReading:
    """The owner's input activity, merged over every sensor that can see it.

    `last_input` is the newest input seen by any sensor (event listener or native idle
    counter), or None when no sensor has seen any input since it started. Counts only:
    never key codes or pointer positions.
    """

    last_input: datetime | None
    input_events: int = 0


@dataclass(frozen=True, slots=True)
class HostReading:
    """The host's own state, excluding what the guests use.

    `owner_cpu_percent` is the host's CPU use in percent of all cores *minus* the guests'
    QEMU processes, i.e. the load the owner causes. `on_battery` is None on a machine
    without a battery, `max_temperature_c` None where no temperature sensor exists.
    """

    owner_cpu_percent: float
    total_memory_mib: int
    cpu_count: int
    on_battery: bool | None = None
    max_temperature_c: float | None = None
