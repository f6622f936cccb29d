"""The schedule grid's cells (pure)."""

from __future__ import annotations

from datetime import time

from donor_app.domain.settings import Weekday, Window
from donor_app.gui.schedule_cells import cells_of, window_for_cells

MON, TUE, FRI, SUN = Weekday.MON, Weekday.TUE, Weekday.FRI, Weekday.SUN


def test_a_window_covers_the_hours_it_touches() -> None:
    cells = cells_of([Window(frozenset({MON}), time(9, 30), time(11, 0))])
    assert cells == {(MON, 9): 0, (MON, 10): 0}


def test_a_window_past_midnight_covers_the_next_morning_and_wraps_the_week() -> None:
    cells = cells_of([Window(frozenset({SUN}), time(22), time(2))])
    assert set(cells) == {(SUN, 22), (SUN, 23), (MON, 0), (MON, 1)}


def test_the_first_window_wins_a_shared_cell() -> None:
    first = Window(frozenset({MON}), time(9), time(10, 30))
    second = Window(frozenset({MON}), time(10, 30), time(12))
    cells = cells_of([first, second])
    assert cells[(MON, 10)] == 0
    assert cells[(MON, 11)] == 1


def test_a_drag_describes_days_and_hours_in_either_direction() -> None:
    window = window_for_cells((FRI, 16), (MON, 9))
    assert window.days == frozenset({MON, TUE, Weekday.WED, Weekday.THU, FRI})
    assert (window.start, window.end) == (time(9), time(17))
    late = window_for_cells((TUE, 23), (TUE, 22))
    assert (late.start, late.end) == (time(22), time(0))
    late.validate("schedule[0]")  # 22:00–00:00 is a valid window
