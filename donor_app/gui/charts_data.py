"""The Activity window's numbers: chart series from history buckets and live samples.

Units chosen so that hour bars and minute bars read alike: CPU as the average number of
host cores the guests used, memory as the average GiB they held. Pure.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import Enum

from donor_app.domain.history import HOUR_SECONDS, HourBucket


class Span(Enum):
    """The chart's time span; the value is the tab's label."""

    HOUR = "Last hour"
    DAY = "Last day"
    WEEK = "Last week"

    @property
    def length(self) -> timedelta:
        if self is Span.HOUR:
            return timedelta(hours=1)
        return timedelta(days=1) if self is Span.DAY else timedelta(days=7)


@dataclass(frozen=True, slots=True)
class Point:
    """One bar: its start, average cores used, average GiB held."""

    start: datetime
    cores: float
    gib: float


def points_from_buckets(buckets: list[HourBucket]) -> list[Point]:
    """Hourly history buckets as bars (CPU-seconds per hour → average cores)."""
    return [Point(b.start, b.cpu_seconds / HOUR_SECONDS, b.memory_gib_hours) for b in buckets]


def axis_labels(points: list[Point], span: Span, count: int = 4) -> list[tuple[int, str]]:
    """About `count` (index, text) labels spread along the x axis, in local time."""
    if not points:
        return []
    step = max(1, len(points) // count)
    style = "%a %H:%M" if span is Span.WEEK else "%H:%M"
    return [(i, f"{points[i].start.astimezone():{style}}") for i in range(0, len(points), step)]


class LiveSeries:
    """The last hour of the guests' usage, per minute, from the status stream.

    The agent's history has hourly buckets only, so "last hour" is drawn from the
    snapshots this tray received (it starts empty when the tray starts). Each minute
    holds the average of its samples; a minute without samples is absent.
    """

    def __init__(self, span: timedelta = timedelta(hours=1)) -> None:
        self._span = span
        self._minutes: deque[tuple[datetime, float, float, int]] = deque()

    def add(self, at: datetime, cpu_percent_of_core: float, memory_mib: float) -> None:
        """One sample: the guests' CPU (percent of one core, summed) and memory now."""
        minute = at.replace(second=0, microsecond=0)
        cores, gib = cpu_percent_of_core / 100, memory_mib / 1024
        if self._minutes and self._minutes[-1][0] == minute:
            _, total_cores, total_gib, n = self._minutes[-1]
            self._minutes[-1] = (minute, total_cores + cores, total_gib + gib, n + 1)
        elif not self._minutes or minute > self._minutes[-1][0]:
            self._minutes.append((minute, cores, gib, 1))
        # A sample older than the newest minute (clock stepped back) is dropped.
        while self._minutes and self._minutes[0][0] <= minute - self._span:
            self._minutes.popleft()

    def points(self, now: datetime) -> list[Point]:
        """The minutes within the span before `now`, oldest first."""
        return [
            Point(start, cores / n, gib / n)
            for start, cores, gib, n in self._minutes
            if start > now - self._span
        ]


def totals_text(cpu_hours: float, gib_hours: float, since: datetime) -> str:
    """The totals line under the charts."""
    return (
        f"Donated since {since.astimezone():%a %H:%M}: {_amount(cpu_hours)} CPU-hours, "
        f"{_amount(gib_hours)} GiB-hours of memory"
    )


def _amount(value: float) -> str:
    """Two decimals, but a small non-zero amount keeps two significant digits (a few
    minutes of donation is 0.0042 CPU-hours, not 0.00)."""
    return f"{value:.2g}" if 0 < value < 0.01 else f"{value:.2f}"
