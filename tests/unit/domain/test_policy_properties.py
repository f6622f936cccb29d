"""Properties of the policy over generated settings, fleet bounds and readings."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, time, timedelta, timezone

from hypothesis import given, settings
from hypothesis import strategies as st

from donor_app.domain.decision import Decision, Level
from donor_app.domain.fleet import FleetPolicy, clamp, locked_fields
from donor_app.domain.policy import Since, caps_at, decide, track
from donor_app.domain.readings import ActivityReading, HostReading
from donor_app.domain.schedule import find
from donor_app.domain.settings import (
    Caps,
    DonationWindow,
    FieldError,
    Limits,
    OwnerLoadLimit,
    Settings,
    Weekday,
    Window,
)

DONATING = {Level.RUN, Level.THROTTLED}
ZONES = [timezone(timedelta(hours=h)) for h in (-8, 0, 1, 5)] + [
    timezone(timedelta(hours=5, minutes=30))
]


def seconds(low: int, high: int) -> st.SearchStrategy[timedelta]:
    return st.integers(low, high).map(lambda s: timedelta(seconds=s))


percents = st.floats(0, 100, allow_nan=False)
quarter_hours = st.integers(0, 95).map(lambda q: time(q // 4, q % 4 * 15))


@st.composite
def limits(draw: st.DrawFn) -> Limits:
    mib = draw(st.none() | st.integers(0, 65536))
    percent = draw(percents if mib is None else st.none() | percents)
    return Limits(draw(percents), memory_mib=mib, memory_percent=percent)


caps = st.builds(Caps, in_use=limits(), idle=limits())


@st.composite
def windows(draw: st.DrawFn) -> Window:
    start = draw(quarter_hours)
    end = draw(quarter_hours.filter(lambda t: t != start))
    days = draw(st.frozensets(st.sampled_from(Weekday), min_size=1))
    return Window(days, start, end, draw(st.sampled_from(["", "office hours"])))


def without_overlaps(items: list[Window]) -> tuple[Window, ...]:
    kept: list[Window] = []
    for item in items:
        try:
            FleetPolicy(blackout=(*kept, item))
        except FieldError:
            continue
        kept.append(item)
    return tuple(kept)


window_lists = st.lists(windows(), max_size=3).map(without_overlaps)


@dataclass(frozen=True)
class World:
    now: datetime
    settings: Settings
    fleet: FleetPolicy
    activity: ActivityReading
    host: HostReading
    since: Since  # already tracked at `now`

    def decide(
        self, at: datetime | None = None, since: Since | None = None
    ) -> tuple[Decision, Since]:
        """Track (from `since`, default the world's) and decide at `at`."""
        at = at or self.now
        tracked = track(since or self.since, at, self.settings, self.activity, self.host)
        return decide(at, self.settings, self.fleet, self.activity, self.host, tracked), tracked


@st.composite
def worlds(draw: st.DrawFn) -> World:
    zone = draw(st.sampled_from(ZONES))
    now = draw(st.datetimes(datetime(2024, 1, 1), datetime(2026, 12, 31), timezones=st.just(zone)))
    entries = draw(window_lists)
    evacuate = draw(seconds(0, 900))
    pause_above = draw(percents)
    settings_ = Settings(
        enabled=draw(st.booleans()),
        caps=draw(caps),
        schedule=tuple(DonationWindow(w, draw(st.none() | caps)) for w in entries),
        idle_after=draw(seconds(0, 600)),
        evacuate_after=evacuate,
        checkpoint_after=draw(seconds(0, 1800)),
        owner_load=OwnerLoadLimit(
            pause_above_percent=pause_above,
            pause_after=draw(seconds(0, 60)),
            resume_below_percent=draw(st.floats(0, pause_above)),
            resume_after=draw(seconds(0, 60)),
        ),
        pause_on_battery=draw(st.booleans()),
        pause_on_heat=draw(st.booleans()),
        max_temperature_c=draw(st.floats(40, 100)),
        snooze_until=draw(st.none() | st.builds(lambda d: now + d, seconds(-3600, 20 * 86400))),
    )
    fleet = FleetPolicy(
        max_cpu_percent=draw(percents),
        max_memory_mib=draw(st.none() | st.integers(0, 65536)),
        max_memory_percent=draw(st.none() | percents),
        blackout=draw(window_lists),
        owner_may_disable=draw(st.booleans()),
    )
    activity = ActivityReading(
        last_input=draw(st.none() | st.builds(lambda d: now - d, seconds(0, 1200))),
    )
    host = HostReading(
        owner_cpu_percent=draw(percents),
        total_memory_mib=draw(st.integers(512, 262144)),
        cpu_count=draw(st.integers(1, 128)),
        on_battery=draw(st.none() | st.booleans()),
        max_temperature_c=draw(st.none() | st.floats(20, 110)),
    )
    # Some history, so that hysteresis and busy timers start in varied states.
    before = now - draw(seconds(0, 900))
    since = track(Since(), before, settings_, activity, host)
    since = track(since, now, settings_, activity, host)
    return World(now, settings_, fleet, activity, host, since)


@given(worlds())
def test_recent_input_never_gets_more_than_the_in_use_caps(world: World) -> None:
    decision, _ = world.decide()
    last = world.activity.last_input
    if last is None or world.now - last >= world.settings.idle_after:
        return
    in_use = caps_at(world.now, world.settings, world.fleet).in_use
    assert decision.level is not Level.RUN
    assert decision.caps.cpu_percent <= in_use.cpu_percent
    assert decision.caps.memory_mib <= in_use.memory_for(world.host.total_memory_mib)


@given(worlds())
def test_never_past_the_fleet_bounds(world: World) -> None:
    decision, _ = world.decide()
    fleet = world.fleet
    assert decision.caps.cpu_percent <= fleet.max_cpu_percent
    if fleet.max_memory_mib is not None or fleet.max_memory_percent is not None:
        bound = Limits(0, memory_mib=fleet.max_memory_mib, memory_percent=fleet.max_memory_percent)
        assert decision.caps.memory_mib <= bound.memory_for(world.host.total_memory_mib)


@given(worlds())
def test_battery_heat_snooze_blackout_and_off_stop_donating(world: World) -> None:
    decision, tracked = world.decide()
    s, host, now = world.settings, world.host, world.now
    stopped = [
        s.pause_on_battery and bool(host.on_battery),
        tracked.hot,
        s.pause_on_heat
        and host.max_temperature_c is not None
        and host.max_temperature_c > s.max_temperature_c,
        s.snooze_until is not None and now < s.snooze_until,
        not s.enabled and world.fleet.owner_may_disable,
        find(world.fleet.blackout, now) is not None,
    ]
    if any(stopped):
        assert decision.level not in DONATING
        assert decision.caps.cpu_percent == 0


@given(worlds())
def test_deciding_again_gives_the_same_decision(world: World) -> None:
    first, tracked = world.decide()
    second, _ = world.decide(since=tracked)
    assert second == first


@settings(deadline=None)
@given(worlds(), st.floats(0, 1))
def test_nothing_changes_before_next_change_and_something_does_at_it(
    world: World, fraction: float
) -> None:
    decision, tracked = world.decide()
    if decision.next_change is None:
        later = world.now + timedelta(days=30 * fraction)
        assert world.decide(later, tracked)[0].same_state(decision)
        return
    assert decision.next_change > world.now
    span = decision.next_change - world.now
    between = world.now + span * fraction
    if between < decision.next_change:
        assert world.decide(between, tracked)[0].same_state(decision)
    assert not world.decide(decision.next_change, tracked)[0].same_state(decision)


@given(worlds())
def test_clamp_is_idempotent_and_locks_what_it_bounds(world: World) -> None:
    clamped = clamp(world.settings, world.fleet)
    assert clamp(clamped, world.fleet) == clamped
    locked = locked_fields(world.settings, world.fleet)
    if world.fleet.max_cpu_percent < 100:
        assert "caps.idle.cpu_percent" in locked
    if not world.fleet.owner_may_disable:
        assert clamped.enabled
        assert "enabled" in locked
