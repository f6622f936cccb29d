"""Which status changes make a desktop notice, and the rate limiter (pure)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from donor_app.domain.decision import Cause, Decision, EffectiveCaps, Level
from donor_app.domain.status import AgentStatus
from donor_app.gui.notices import Notice, RateLimiter, notice_for

T0 = datetime(2025, 1, 6, 9, 0, tzinfo=UTC)


def snap(level: Level, cause: Cause, reason: str = "why") -> AgentStatus:
    caps = EffectiveCaps(100.0 if level is Level.RUN else 0.0, 1024)
    return AgentStatus(at=T0, decision=Decision(level, cause, caps, reason), guests=())


RUN = snap(Level.RUN, Cause.IDLE, "Donating up to 100 % CPU — office hours until 17:00")


@pytest.mark.parametrize("cause", [Cause.SCHEDULE, Cause.BATTERY, Cause.HEAT, Cause.BLACKOUT])
def test_stopping_for_a_reason_the_owner_did_not_cause_is_announced(cause: Cause) -> None:
    stopped = snap(Level.PAUSED, cause, "Paused — on battery")
    assert notice_for(RUN, stopped) == Notice("Donating stopped", "Paused — on battery")
    assert notice_for(stopped, RUN) == Notice("Donating again", RUN.decision.reason)


@pytest.mark.parametrize(
    "cause",
    [Cause.OWNER_ACTIVE, Cause.OWNER_LOAD, Cause.SNOOZED, Cause.DISABLED, Cause.ZERO_CAP],
)
def test_what_the_owner_caused_is_not_announced(cause: Cause) -> None:
    stopped = snap(Level.PAUSED, cause)
    assert notice_for(RUN, stopped) is None
    assert notice_for(stopped, RUN) is None


def test_no_notice_without_a_change_of_donating() -> None:
    throttled = snap(Level.THROTTLED, Cause.OWNER_ACTIVE)
    assert notice_for(RUN, throttled) is None  # still donating, only less
    assert notice_for(None, snap(Level.PAUSED, Cause.BATTERY)) is None  # first snapshot
    battery = snap(Level.PAUSED, Cause.BATTERY)
    assert notice_for(battery, snap(Level.PAUSED, Cause.HEAT)) is None


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now


def test_rate_limiter_allows_a_burst_then_refuses_until_the_window_slides() -> None:
    clock = Clock()
    limiter = RateLimiter(3, timedelta(minutes=15), clock)
    assert [limiter.allow() for _ in range(4)] == [True, True, True, False]
    clock.now += timedelta(minutes=14, seconds=59)
    assert not limiter.allow()
    clock.now = T0 + timedelta(minutes=15)
    assert limiter.allow()  # the first three left the window
    assert limiter.allow()
    assert limiter.allow()
    assert not limiter.allow()


def test_refused_events_do_not_count() -> None:
    clock = Clock()
    limiter = RateLimiter(1, timedelta(minutes=1), clock)
    assert limiter.allow()
    for _ in range(10):
        clock.now += timedelta(seconds=5)
        assert not limiter.allow()
    clock.now = T0 + timedelta(minutes=1)
    assert limiter.allow()


def test_rate_limiter_rejects_a_zero_limit() -> None:
    with pytest.raises(ValueError, match="limit"):
        RateLimiter(0, timedelta(minutes=1), Clock())
