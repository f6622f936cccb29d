"""Calendar arithmetic on weekly windows: which window holds a moment, when the next
window starts, when the next start or end comes.

The wall clock is the one of the datetime passed in (its `tzinfo`): windows are local
times, so callers pass moments in the owner's local zone. Results carry the same
`tzinfo`. Arithmetic is on the wall clock; a DST jump shifts a result by the jump, which
the engine absorbs because it decides again on every tick.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from datetime import datetime, time, timedelta

from donor_app.domain.settings import WEEK, Window


def find(windows: Sequence[Window], at: datetime) -> int | None:
    """The index of the window holding `at` (start inclusive, end exclusive), or None."""
    offset = _offset(at)
    for index, window in enumerate(windows):
        if any(_end_of_occurrence(span, offset) is not None for span in window.spans()):
            return index
    return None


def occurrence_end(window: Window, at: datetime) -> datetime | None:
    """When the occurrence of `window` holding `at` ends, or None if `at` is outside."""
    offset = _offset(at)
    for span in window.spans():
        end = _end_of_occurrence(span, offset)
        if end is not None:
            return _wall(at, end)
    return None


def next_start(windows: Sequence[Window], at: datetime) -> datetime | None:
    """The first moment after `at` at which one of `windows` starts (None if no windows)."""
    return _first_after(at, (start for window in windows for start, _ in window.spans()))


def next_boundary(windows: Sequence[Window], at: datetime) -> datetime | None:
    """The first moment after `at` at which one of `windows` starts or ends."""
    return _first_after(
        at, (edge for window in windows for span in window.spans() for edge in span)
    )


def _end_of_occurrence(span: tuple[timedelta, timedelta], offset: timedelta) -> timedelta | None:
    """The end (relative to this week's Monday) if `offset` lies in the span, else None."""
    start, end = span
    if start <= offset < end:
        return end
    # A span running from Sunday into Monday holds the early Monday hours of this week.
    if start <= offset + WEEK < end:
        return end - WEEK
    return None


def _first_after(at: datetime, edges: Iterator[timedelta]) -> datetime | None:
    offset = _offset(at)
    later = [
        shifted
        for edge in edges
        for shifted in (edge - WEEK, edge, edge + WEEK)
        if shifted > offset
    ]
    return _wall(at, min(later)) if later else None


def _monday(at: datetime) -> datetime:
    """Monday 00:00 of the week of `at`, naive wall clock."""
    local = at.replace(tzinfo=None)
    return datetime.combine(local.date() - timedelta(days=local.weekday()), time())


def _offset(at: datetime) -> timedelta:
    return at.replace(tzinfo=None) - _monday(at)


def _wall(at: datetime, offset: timedelta) -> datetime:
    """The moment `offset` after Monday 00:00 of `at`'s week, in `at`'s zone."""
    return (_monday(at) + offset).replace(tzinfo=at.tzinfo)
