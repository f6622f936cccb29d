"""The settings model: validation names the field path and the allowed range."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, time, timedelta

import pytest

from donor_app.domain.settings import (
    DEFAULT_CAPS,
    EVERY_DAY,
    WORKDAYS,
    Caps,
    DonationWindow,
    FieldError,
    Limits,
    OwnerLoadLimit,
    Settings,
    Weekday,
    Window,
)


def office(days: frozenset[Weekday] = WORKDAYS, start: int = 9, end: int = 17) -> DonationWindow:
    return DonationWindow(Window(days, time(start), time(end), "office hours"))


def test_defaults_are_valid_and_donate_any_time() -> None:
    settings = Settings()
    assert settings.schedule == ()
    assert settings.caps.in_use.cpu_percent == 0
    assert settings.caps.idle.cpu_percent == 100
    assert settings.idle_after == timedelta(seconds=180)
    assert settings.evacuate_after == timedelta(seconds=120)
    assert settings.checkpoint_after == timedelta(seconds=600)
    assert settings.pause_on_battery
    assert settings.max_temperature_c == 85


@pytest.mark.parametrize(
    ("make", "path", "allowed"),
    [
        (
            lambda: Settings(caps=Caps(Limits(101, memory_percent=50), DEFAULT_CAPS.idle)),
            "caps.in_use.cpu_percent",
            "0–100",
        ),
        (
            lambda: Settings(caps=Caps(DEFAULT_CAPS.in_use, Limits(-1, memory_percent=50))),
            "caps.idle.cpu_percent",
            "0–100",
        ),
        (
            lambda: Settings(caps=Caps(DEFAULT_CAPS.in_use, Limits(math.nan, memory_mib=1))),
            "caps.idle.cpu_percent",
            "0–100",
        ),
        (
            lambda: Settings(caps=Caps(DEFAULT_CAPS.in_use, Limits(10, memory_mib=-1))),
            "caps.idle.memory_mib",
            "≥ 0",
        ),
        (
            lambda: Settings(caps=Caps(DEFAULT_CAPS.in_use, Limits(10, memory_percent=150))),
            "caps.idle.memory_percent",
            "0–100",
        ),
        (
            lambda: Settings(caps=Caps(DEFAULT_CAPS.in_use, Limits(10))),
            "caps.idle",
            "memory_mib or memory_percent",
        ),
        (lambda: Settings(idle_after=timedelta(seconds=-1)), "idle_after", "≥ 0"),
        (lambda: Settings(evacuate_after=timedelta(seconds=-1)), "evacuate_after", "≥ 0"),
        (lambda: Settings(checkpoint_after=timedelta(seconds=-5)), "checkpoint_after", "≥ 0"),
        (
            lambda: Settings(owner_load=OwnerLoadLimit(pause_above_percent=120)),
            "owner_load.pause_above_percent",
            "0–100",
        ),
        (
            lambda: Settings(owner_load=OwnerLoadLimit(resume_below_percent=30)),
            "owner_load.resume_below_percent",
            "≤ pause_above_percent",
        ),
        (
            lambda: Settings(owner_load=OwnerLoadLimit(pause_after=timedelta(seconds=-1))),
            "owner_load.pause_after",
            "≥ 0",
        ),
        (lambda: Settings(max_temperature_c=500), "max_temperature_c", "0–150"),
        (lambda: Settings(snooze_until=datetime(2025, 1, 1, 12)), "snooze_until", "timezone"),
        (lambda: Settings(schedule=(office(days=frozenset()),)), "schedule[0].days", "one day"),
        (lambda: Settings(schedule=(office(start=9, end=9),)), "schedule[0].end", "differ"),
        (
            lambda: Settings(
                schedule=(office(), office(days=frozenset({Weekday.FRI}), start=16, end=18))
            ),
            "schedule[1]",
            "overlaps schedule[0]",
        ),
        (
            lambda: Settings(
                schedule=(
                    DonationWindow(
                        Window(WORKDAYS, time(9), time(17)),
                        Caps(DEFAULT_CAPS.in_use, Limits(200, memory_mib=1)),
                    ),
                )
            ),
            "schedule[0].caps.idle.cpu_percent",
            "0–100",
        ),
    ],
)
def test_invalid_settings_name_the_field_and_range(
    make: Callable[[], object], path: str, allowed: str
) -> None:
    with pytest.raises(FieldError) as caught:
        make()
    assert caught.value.path == path
    assert allowed in str(caught.value)
    assert str(caught.value).startswith(f"{path}: ")


def test_field_error_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="idle_after"):
        Settings(idle_after=timedelta(seconds=-1))


def test_replace_validates_again() -> None:
    with pytest.raises(FieldError):
        replace(Settings(), max_temperature_c=-3)


@pytest.mark.parametrize(
    ("first", "second"),
    [
        # Windows crossing midnight overlap the early hours of the next day.
        (
            Window(frozenset({Weekday.MON}), time(22), time(6)),
            Window(frozenset({Weekday.TUE}), time(5), time(7)),
        ),
        # Sunday night runs into Monday morning: the week is a circle.
        (
            Window(frozenset({Weekday.SUN}), time(22), time(6)),
            Window(frozenset({Weekday.MON}), time(1), time(2)),
        ),
        (
            Window(EVERY_DAY, time(12), time(13)),
            Window(frozenset({Weekday.WED}), time(0), time(23)),
        ),
    ],
)
def test_overlapping_windows_are_rejected(first: Window, second: Window) -> None:
    with pytest.raises(FieldError, match=r"schedule\[1\]: overlaps schedule\[0\]"):
        Settings(schedule=(DonationWindow(first), DonationWindow(second)))


def test_touching_windows_do_not_overlap() -> None:
    Settings(
        schedule=(
            DonationWindow(Window(EVERY_DAY, time(0), time(12))),
            DonationWindow(Window(EVERY_DAY, time(12), time(0))),
        )
    )


def test_window_spans_cross_midnight_and_the_week_end() -> None:
    window = Window(frozenset({Weekday.MON, Weekday.SUN}), time(22), time(6))
    assert window.length == timedelta(hours=8)
    assert window.spans() == (
        (timedelta(hours=22), timedelta(days=1, hours=6)),
        (timedelta(days=6, hours=22), timedelta(days=7, hours=6)),
    )
    assert window.describe() == "Mon, Sun 22:00–06:00"


@pytest.mark.parametrize(
    ("limits", "total", "expected"),
    [
        (Limits(10, memory_mib=4096), 16384, 4096),
        (Limits(10, memory_percent=25), 16384, 4096),
        (Limits(10, memory_mib=2048, memory_percent=25), 16384, 2048),
        (Limits(10, memory_mib=100_000), 16384, 16384),
        (Limits(10, memory_percent=0), 16384, 0),
    ],
)
def test_memory_resolves_against_the_host_ram(limits: Limits, total: int, expected: int) -> None:
    assert limits.memory_for(total) == expected


def test_caps_of_a_window_fall_back_to_the_default_caps() -> None:
    own = Caps(Limits(5, memory_mib=1), Limits(50, memory_mib=2))
    settings = Settings(
        schedule=(office(), DonationWindow(Window(WORKDAYS, time(18), time(20)), own))
    )
    assert settings.caps_of(None) == settings.caps
    assert settings.caps_of(settings.schedule[0]) == settings.caps
    assert settings.caps_of(settings.schedule[1]) == own


def test_snooze_must_be_aware() -> None:
    Settings(snooze_until=datetime(2025, 1, 1, 12, tzinfo=UTC))
