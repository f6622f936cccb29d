"""Donation history as value types: hourly buckets, totals, and the UTC hour arithmetic.

The agent keeps the history (`donor_app.agent.history`, SQLite); the tray charts these.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime

HOUR_SECONDS = 3600


@dataclass(frozen=True, slots=True)
class HourBucket:
    """What was donated during one UTC hour, summed over guests.

    `start` is the hour's start (timezone-aware, UTC). `memory_gib_hours` is the integral
    of the guests' memory over the hour, e.g. 2 GiB held for 30 minutes is 1.0.
    """

    start: datetime
    cpu_seconds: float
    memory_gib_hours: float


@dataclass(frozen=True, slots=True)
class Totals:
    """What was donated over a span of hours: CPU-hours and memory GiB-hours."""

    cpu_hours: float
    gib_hours: float


def require_aware(name: str, value: datetime) -> None:
    """Raise ValueError, naming the field, for a naive datetime."""
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{name}: must be timezone-aware, got naive {value.isoformat()}")


def hour_floor(value: datetime) -> int:
    """UNIX seconds of the start of the UTC hour containing `value`."""
    return math.floor(value.timestamp()) // HOUR_SECONDS * HOUR_SECONDS


def hour_ceil(value: datetime) -> int:
    """UNIX seconds of the first UTC hour start at or after `value`."""
    return -(-math.ceil(value.timestamp()) // HOUR_SECONDS) * HOUR_SECONDS


def hour_start(hour: int) -> datetime:
    """The UTC datetime of an hour start given in UNIX seconds."""
    return datetime.fromtimestamp(hour, UTC)


def hour_window(now: datetime, hours: int) -> tuple[datetime, datetime]:
    """The `hours` UTC hour buckets ending with the one containing `now`, as (start, end).

    The current, partial hour counts as one of them, so `hour_window(now, 24)` is the
    chart of "the last day": 24 bars, the last one still growing.
    """
    require_aware("now", now)
    if hours < 1:
        raise ValueError(f"hours: must be at least 1, got {hours}")
    end = hour_floor(now) + HOUR_SECONDS
    return hour_start(end - hours * HOUR_SECONDS), hour_start(end)
