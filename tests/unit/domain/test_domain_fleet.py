"""Fleet bounds: validation, clamping, locked fields."""

from __future__ import annotations

from collections.abc import Callable
from datetime import time

import pytest

from donor_app.domain.fleet import FleetPolicy, clamp, locked_fields
from donor_app.domain.settings import (
    EVERY_DAY,
    WORKDAYS,
    Caps,
    DonationWindow,
    FieldError,
    Limits,
    Settings,
    Window,
)

OWN = Caps(Limits(30, memory_mib=8192), Limits(90, memory_percent=80))
SETTINGS = Settings(
    enabled=False,
    schedule=(
        DonationWindow(Window(WORKDAYS, time(9), time(17))),
        DonationWindow(Window(WORKDAYS, time(18), time(23)), OWN),
    ),
)


def test_the_default_policy_changes_nothing() -> None:
    assert clamp(SETTINGS, FleetPolicy()) == SETTINGS
    assert locked_fields(SETTINGS, FleetPolicy()) == {}


def test_clamp_bounds_every_cap() -> None:
    fleet = FleetPolicy(max_cpu_percent=50, max_memory_mib=4096, max_memory_percent=60)
    clamped = clamp(SETTINGS, fleet)
    window_caps = clamped.schedule[1].caps
    assert window_caps is not None
    assert clamped.schedule[0].caps is None  # still "the default caps", which are clamped
    for caps in (clamped.caps, window_caps):
        for limits in (caps.in_use, caps.idle):
            assert limits.cpu_percent <= 50
            assert limits.memory_mib == 4096
            assert limits.memory_percent is not None
            assert limits.memory_percent <= 60
    assert window_caps.in_use.cpu_percent == 30  # below the bound: kept
    assert window_caps.idle == Limits(50, memory_mib=4096, memory_percent=60)
    assert not clamped.enabled  # the fleet lets the owner switch off


def test_clamp_switches_donating_on_when_the_owner_may_not_disable() -> None:
    assert clamp(SETTINGS, FleetPolicy(owner_may_disable=False)).enabled


def test_locked_fields_name_paths_and_the_admins_reason() -> None:
    fleet = FleetPolicy(
        max_cpu_percent=50,
        max_memory_percent=60,
        owner_may_disable=False,
        blackout=(Window(EVERY_DAY, time(1), time(3), "backups"),),
        reason="IT policy",
    )
    locked = locked_fields(SETTINGS, fleet)
    assert set(locked) == {
        "enabled",
        "schedule",
        *(
            f"{prefix}.{situation}.{field}"
            for prefix in ("caps", "schedule[1].caps")
            for situation in ("in_use", "idle")
            for field in ("cpu_percent", "memory_mib", "memory_percent")
        ),
    }
    assert locked["caps.idle.cpu_percent"] == "at most 50 % CPU — IT policy"
    assert locked["caps.in_use.memory_mib"] == "at most 60 % of the RAM — IT policy"
    assert locked["enabled"].endswith("— IT policy")
    assert "Mon, Tue, Wed, Thu, Fri, Sat, Sun 01:00–03:00 (backups)" in locked["schedule"]


@pytest.mark.parametrize(
    ("make", "path"),
    [
        (lambda: FleetPolicy(max_cpu_percent=101), "max_cpu_percent"),
        (lambda: FleetPolicy(max_memory_mib=-1), "max_memory_mib"),
        (lambda: FleetPolicy(max_memory_percent=-1), "max_memory_percent"),
        (lambda: FleetPolicy(reason=" "), "reason"),
        (lambda: FleetPolicy(blackout=(Window(WORKDAYS, time(1), time(1)),)), "blackout[0].end"),
        (
            lambda: FleetPolicy(
                blackout=(
                    Window(WORKDAYS, time(1), time(3)),
                    Window(WORKDAYS, time(2), time(4)),
                )
            ),
            "blackout[1]",
        ),
    ],
)
def test_invalid_policy_names_the_field(make: Callable[[], object], path: str) -> None:
    with pytest.raises(FieldError) as caught:
        make()
    assert caught.value.path == path
