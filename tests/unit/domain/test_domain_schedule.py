"""Calendar arithmetic on weekly windows."""

from __future__ import annotations

from datetime import date, datetime, time, timedelta, timezone

import pytest

from donor_app.domain.schedule import find, next_boundary, next_start, occurrence_end
from donor_app.domain.settings import WORKDAYS, Weekday, Window

TZ = timezone(timedelta(hours=1))
MONDAY = date(2025, 1, 6)


def at(day: int, hour: int, minute: int = 0) -> datetime:
    """`day` days after Monday 2025-01-06, at hour:minute in TZ."""
    return datetime.combine(MONDAY + timedelta(days=day), time(hour, minute), TZ)


OFFICE = Window(WORKDAYS, time(9), time(17), "office")
NIGHTS = Window(frozenset({Weekday.FRI, Weekday.SUN}), time(22), time(6), "nights")
WINDOWS = (OFFICE, NIGHTS)


@pytest.mark.parametrize(
    ("moment", "index", "end"),
    [
        (at(0, 9), 0, at(0, 17)),  # start is inclusive
        (at(0, 16, 59), 0, at(0, 17)),
        (at(0, 17), None, None),  # end is exclusive
        (at(5, 10), None, None),  # Saturday
        (at(4, 23), 1, at(5, 6)),  # Friday night, ends Saturday
        (at(5, 5, 59), 1, at(5, 6)),  # Saturday early hours belong to Friday's window
        (at(5, 6), None, None),
        (at(6, 22), 1, at(7, 6)),  # Sunday night runs into next Monday
        (at(0, 3), 1, at(0, 6)),  # Monday early hours belong to the previous Sunday
        (at(0, 6), None, None),
    ],
)
def test_find_and_occurrence_end(moment: datetime, index: int | None, end: datetime | None) -> None:
    assert find(WINDOWS, moment) == index
    if index is not None:
        assert occurrence_end(WINDOWS[index], moment) == end
    assert occurrence_end(OFFICE, at(5, 10)) is None


@pytest.mark.parametrize(
    ("moment", "start"),
    [
        (at(0, 8), at(0, 9)),
        (at(0, 9), at(1, 9)),  # strictly after
        (at(4, 17), at(4, 22)),
        (at(5, 7), at(6, 22)),
        (at(6, 23), at(7, 9)),  # Sunday night → next Monday
    ],
)
def test_next_start(moment: datetime, start: datetime) -> None:
    assert next_start(WINDOWS, moment) == start


@pytest.mark.parametrize(
    ("moment", "edge"),
    [
        (at(0, 3), at(0, 6)),  # the end of Sunday's window
        (at(0, 6), at(0, 9)),
        (at(0, 9), at(0, 17)),
        (at(4, 22), at(5, 6)),
        (at(6, 22, 30), at(7, 6)),
    ],
)
def test_next_boundary(moment: datetime, edge: datetime) -> None:
    assert next_boundary(WINDOWS, moment) == edge


def test_no_windows_no_moments() -> None:
    assert find((), at(0, 9)) is None
    assert next_start((), at(0, 9)) is None
    assert next_boundary((), at(0, 9)) is None


def test_results_keep_the_time_zone_of_the_question() -> None:
    other = timezone(timedelta(hours=-5))
    moment = datetime(2025, 1, 6, 8, tzinfo=other)
    result = next_start(WINDOWS, moment)
    assert result == datetime(2025, 1, 6, 9, tzinfo=other)
    assert result is not None
    assert result.tzinfo is other
