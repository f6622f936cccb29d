"""The schedule editor's grid (7 days × 24 hours) as plain data. Pure.

A cell (day, hour) belongs to a window when the window covers any part of that hour; a
window crossing midnight covers the early hours of the next day (Sunday → Monday).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import time, timedelta

from donor_app.domain.settings import WEEK, Weekday, Window

HOUR = timedelta(hours=1)
Cell = tuple[Weekday, int]


def cells_of(windows: Sequence[Window]) -> dict[Cell, int]:
    """Each covered cell → the index of the (first) window covering it."""
    covered: dict[Cell, int] = {}
    for index, window in enumerate(windows):
        for start, end in window.spans():
            hour = start - start % HOUR  # floor to the hour
            while hour < end:
                offset = hour % WEEK
                day, rest = divmod(offset, timedelta(days=1))
                covered.setdefault((Weekday(day), rest // HOUR), index)
                hour += HOUR
    return covered


def window_for_cells(first: Cell, last: Cell, label: str = "") -> Window:
    """The window a drag from cell `first` to cell `last` (inclusive) describes: the days
    between them and the hours between them, e.g. Mon 9 → Fri 16 is Mon–Fri 09:00–17:00.
    """
    (day_a, hour_a), (day_b, hour_b) = first, last
    days = frozenset(Weekday(d) for d in range(min(day_a, day_b), max(day_a, day_b) + 1))
    start, end = min(hour_a, hour_b), max(hour_a, hour_b) + 1
    return Window(days=days, start=time(start), end=time(end % 24), label=label)
