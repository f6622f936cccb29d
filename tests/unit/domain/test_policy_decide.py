"""decide() and track(): table-driven cases and the escalation ladder over ticks."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, time, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest

from donor_app.domain.decision import Cause, Decision, EffectiveCaps, Level
from donor_app.domain.fleet import FleetPolicy
from donor_app.domain.policy import Since, decide, track
from donor_app.domain.readings import ActivityReading, HostReading
from donor_app.domain.settings import (
    EVERY_DAY,
    WORKDAYS,
    Caps,
    DonationWindow,
    Limits,
    Settings,
    Weekday,
    Window,
)

TZ = timezone(timedelta(hours=1))
MONDAY = date(2025, 1, 6)


def at(day: int, hour: int, minute: int = 0, second: int = 0) -> datetime:
    """`day` days after Monday 2025-01-06, in TZ."""
    return datetime.combine(MONDAY + timedelta(days=day), time(hour, minute, second), TZ)


NOW = at(0, 10)  # Monday 10:00
SECOND = timedelta(seconds=1)
HOST = HostReading(owner_cpu_percent=5.0, total_memory_mib=16384, cpu_count=8)
IDLE = ActivityReading(last_input=None)
ACTIVE = ActivityReading(last_input=NOW - 5 * SECOND)
OFFICE = Settings(
    schedule=(
        DonationWindow(
            Window(WORKDAYS, time(9), time(17), "office hours"),
            Caps(in_use=Limits(25, memory_percent=25), idle=Limits(100, memory_percent=50)),
        ),
        DonationWindow(Window(EVERY_DAY, time(22), time(6), "nights")),
    )
)
BACKUPS = FleetPolicy(blackout=(Window(EVERY_DAY, time(1), time(3), "nightly backups"),))


@dataclass
class Case:
    name: str
    expected: tuple[Level, Cause, EffectiveCaps, str, datetime | None]
    now: datetime = NOW
    settings: Settings = field(default_factory=Settings)
    fleet: FleetPolicy = field(default_factory=FleetPolicy)
    activity: ActivityReading = IDLE
    host: HostReading = HOST


def caps(cpu: float, mib: int) -> EffectiveCaps:
    return EffectiveCaps(cpu_percent=cpu, memory_mib=mib)


CASES = [
    Case(
        "default, idle: donate everything, nothing will change",
        (
            Level.RUN,
            Cause.IDLE,
            caps(100, 8192),
            "Donating up to 100 % CPU — this computer is idle",
            None,
        ),
    ),
    Case(
        "default, owner active: pause until idle_after has passed",
        (
            Level.PAUSED,
            Cause.OWNER_ACTIVE,
            caps(0, 8192),
            "Paused — you are using this computer",
            NOW - 5 * SECOND + timedelta(seconds=180),
        ),
        activity=ACTIVE,
    ),
    Case(
        "office hours, idle",
        (
            Level.RUN,
            Cause.IDLE,
            caps(100, 8192),
            "Donating up to 100 % CPU — office hours until 17:00",
            at(0, 17),
        ),
        settings=OFFICE,
    ),
    Case(
        "office hours, owner active: throttled to the window's in-use caps",
        (
            Level.THROTTLED,
            Cause.OWNER_ACTIVE,
            caps(25, 4096),
            "Limited to 25 % CPU — office hours until 17:00",
            NOW - 5 * SECOND + timedelta(seconds=180),
        ),
        settings=OFFICE,
        activity=ACTIVE,
    ),
    Case(
        "between windows",
        (
            Level.PAUSED,
            Cause.SCHEDULE,
            caps(0, 8192),
            "Outside donation hours — until 22:00",
            at(0, 22),
        ),
        now=at(0, 18),
        settings=OFFICE,
    ),
    Case(
        "after the last window of the week",
        (
            Level.PAUSED,
            Cause.SCHEDULE,
            caps(0, 8192),
            "Outside donation hours — until Mon 09:00",
            at(7, 0),  # at midnight the wording becomes "until 09:00"
        ),
        now=at(6, 7),
        settings=replace(OFFICE, schedule=OFFICE.schedule[:1]),
    ),
    Case(
        "a window across midnight",
        (
            Level.RUN,
            Cause.IDLE,
            caps(100, 8192),
            "Donating up to 100 % CPU — nights until 06:00",
            at(2, 6),
        ),
        now=at(2, 2),
        settings=OFFICE,
    ),
    Case(
        "a window across midnight, before midnight",
        (
            Level.RUN,
            Cause.IDLE,
            caps(100, 8192),
            "Donating up to 100 % CPU — nights until Tue 06:00",
            at(1, 0),
        ),  # at midnight the wording becomes "until 06:00"
        now=at(0, 23),
        settings=OFFICE,
    ),
    Case(
        "snoozed",
        (Level.PAUSED, Cause.SNOOZED, caps(0, 8192), "Snoozed until 15:00", at(0, 15)),
        settings=Settings(snooze_until=at(0, 15)),
    ),
    Case(
        "snooze written in another zone is shown in local time",
        (Level.PAUSED, Cause.SNOOZED, caps(0, 8192), "Snoozed until Tue 15:00", at(1, 0)),
        settings=Settings(snooze_until=at(1, 15).astimezone(UTC)),
    ),
    Case(
        "snooze over",
        (
            Level.RUN,
            Cause.IDLE,
            caps(100, 8192),
            "Donating up to 100 % CPU — this computer is idle",
            None,
        ),
        settings=Settings(snooze_until=NOW),
    ),
    Case(
        "on battery",
        (Level.PAUSED, Cause.BATTERY, caps(0, 8192), "Paused — on battery", None),
        host=replace(HOST, on_battery=True),
    ),
    Case(
        "on battery, owner allows it",
        (
            Level.RUN,
            Cause.IDLE,
            caps(100, 8192),
            "Donating up to 100 % CPU — this computer is idle",
            None,
        ),
        settings=Settings(pause_on_battery=False),
        host=replace(HOST, on_battery=True),
    ),
    Case(
        "too hot",
        (Level.PAUSED, Cause.HEAT, caps(0, 8192), "Paused — too hot (91 °C)", None),
        host=replace(HOST, max_temperature_c=91.2),
    ),
    Case(
        "no temperature sensor",
        (
            Level.RUN,
            Cause.IDLE,
            caps(100, 8192),
            "Donating up to 100 % CPU — this computer is idle",
            None,
        ),
        host=replace(HOST, max_temperature_c=None),
    ),
    Case(
        "switched off",
        (Level.PAUSED, Cause.DISABLED, caps(0, 8192), "Paused — donating is switched off", None),
        settings=Settings(enabled=False),
        fleet=BACKUPS,  # its edges do not change the decision, so no next_change
    ),
    Case(
        "switched off, but the fleet does not allow it",
        (
            Level.RUN,
            Cause.IDLE,
            caps(100, 8192),
            "Donating up to 100 % CPU — this computer is idle",
            None,
        ),
        settings=Settings(enabled=False),
        fleet=FleetPolicy(owner_may_disable=False),
    ),
    Case(
        "fleet blackout",
        (
            Level.PAUSED,
            Cause.BLACKOUT,
            caps(0, 8192),
            "Paused — nightly backups until 03:00",
            at(0, 3),
        ),
        now=at(0, 1, 30),
        fleet=BACKUPS,
    ),
    Case(
        "fleet bounds",
        (
            Level.RUN,
            Cause.IDLE,
            caps(40, 2048),
            "Donating up to 40 % CPU — this computer is idle",
            None,
        ),
        fleet=FleetPolicy(max_cpu_percent=40, max_memory_mib=2048),
    ),
    Case(
        "fleet forbids any CPU",
        (Level.PAUSED, Cause.ZERO_CAP, caps(0, 8192), "Paused — the limit is 0 % CPU", None),
        fleet=FleetPolicy(max_cpu_percent=0),
    ),
    Case(
        "no memory allowed",
        (Level.PAUSED, Cause.ZERO_CAP, caps(0, 0), "Paused — the limit is 0 MiB of memory", None),
        fleet=FleetPolicy(max_memory_mib=0),
    ),
    Case(
        "snooze beats the schedule and battery",
        (Level.PAUSED, Cause.SNOOZED, caps(0, 8192), "Snoozed until 19:00", at(0, 19)),
        now=at(0, 18),
        settings=replace(OFFICE, snooze_until=at(0, 19)),
        host=replace(HOST, on_battery=True),
    ),
    Case(
        "snoozed for longer than a week",
        (Level.PAUSED, Cause.SNOOZED, caps(0, 8192), "Snoozed until 2025-01-20 10:00", at(8, 0)),
        settings=Settings(snooze_until=at(14, 10)),
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_decide(case: Case) -> None:
    since = track(Since(), case.now, case.settings, case.activity, case.host)
    decision = decide(case.now, case.settings, case.fleet, case.activity, case.host, since)
    assert (
        decision.level,
        decision.cause,
        decision.caps,
        decision.reason,
        decision.next_change,
    ) == case.expected


class Machine:
    """Ticks the policy the way the engine does, with readings changed between ticks."""

    def __init__(self, settings: Settings = OFFICE, start: datetime = NOW) -> None:
        self.settings = settings
        self.now = start
        self.since = Since()
        self.activity = IDLE
        self.host = HOST

    def tick(self, seconds: float = 0, *, touch: bool = False) -> Decision:
        self.now += timedelta(seconds=seconds)
        if touch:
            self.activity = ActivityReading(last_input=self.now)
        self.since = track(self.since, self.now, self.settings, self.activity, self.host)
        return decide(self.now, self.settings, FleetPolicy(), self.activity, self.host, self.since)

    def work(self, seconds: int, every: int = 10) -> Decision:
        """The owner keeps using the machine, with input every `every` seconds."""
        decision = self.tick(touch=True)
        for _ in range(seconds // every):
            decision = self.tick(every, touch=True)
        return decision


def test_the_escalation_ladder() -> None:
    machine = Machine()
    assert machine.tick().level is Level.RUN
    assert machine.tick(touch=True).level is Level.THROTTLED
    assert machine.work(110).level is Level.THROTTLED
    evacuate = machine.work(10)  # 120 s of work
    assert (evacuate.level, evacuate.cause) == (Level.EVACUATE, Cause.OWNER_ACTIVE)
    assert evacuate.caps == caps(0, 4096)
    assert evacuate.reason == "Moving the guest to another computer — you are using this computer"
    assert machine.work(470).level is Level.EVACUATE
    checkpoint = machine.work(10)  # 600 s of work
    assert (checkpoint.level, checkpoint.caps) == (Level.CHECKPOINT, caps(0, 0))
    # The owner leaves: nothing changes until idle_after has passed.
    assert checkpoint.next_change == machine.now + timedelta(seconds=180)
    assert machine.tick(179).level is Level.CHECKPOINT
    back = machine.tick(1)
    assert (back.level, back.caps) == (Level.RUN, caps(100, 8192))


def test_one_touch_does_not_evacuate() -> None:
    machine = Machine()
    machine.tick(touch=True)
    decision = machine.tick(170)
    assert decision.level is Level.THROTTLED
    assert machine.tick(10).level is Level.RUN


def test_a_gap_of_idle_after_starts_a_new_stretch() -> None:
    machine = Machine()
    machine.work(100)
    # The machine sleeps for an hour (no ticks) and the owner comes back.
    machine.now += timedelta(hours=1)
    assert machine.tick(touch=True).level is Level.THROTTLED
    assert machine.work(100).level is Level.THROTTLED


def test_owner_load_pauses_with_hysteresis() -> None:
    machine = Machine(settings=Settings())
    machine.host = replace(HOST, owner_cpu_percent=40)
    assert machine.tick().level is Level.RUN
    first = machine.tick(9)
    assert first.level is Level.RUN
    assert first.next_change == machine.now + SECOND
    paused = machine.tick(1)
    assert (paused.level, paused.cause) == (Level.PAUSED, Cause.OWNER_LOAD)
    assert paused.reason == "Paused — your programs are busy"
    machine.host = replace(HOST, owner_cpu_percent=20)  # between the thresholds: stays paused
    assert machine.tick(60).cause is Cause.OWNER_LOAD
    machine.host = replace(HOST, owner_cpu_percent=10)
    assert machine.tick(1).cause is Cause.OWNER_LOAD
    assert machine.tick(29).cause is Cause.OWNER_LOAD
    assert machine.tick(1).level is Level.RUN


def test_high_owner_load_escalates_by_itself() -> None:
    machine = Machine(settings=Settings())
    machine.host = replace(HOST, owner_cpu_percent=90)
    machine.tick()
    paused = machine.tick(10)
    # The load counts from when it went above the threshold, 10 s ago.
    assert paused.next_change == NOW + timedelta(seconds=120)
    assert machine.tick(109).level is Level.PAUSED
    evacuate = machine.tick(1)
    assert (evacuate.level, evacuate.cause) == (Level.EVACUATE, Cause.OWNER_LOAD)
    assert evacuate.reason == "Moving the guest to another computer — your programs are busy"


def test_heat_pauses_with_hysteresis() -> None:
    machine = Machine(settings=Settings())
    machine.host = replace(HOST, max_temperature_c=86)
    assert machine.tick().cause is Cause.HEAT
    machine.host = replace(HOST, max_temperature_c=81)
    assert machine.tick(5).reason == "Paused — too hot (81 °C)"
    machine.host = replace(HOST, max_temperature_c=79)
    assert machine.tick(5).level is Level.RUN
    machine.host = replace(HOST, max_temperature_c=85)  # at the limit, not above it
    assert machine.tick(5).level is Level.RUN


def test_zero_in_use_cpu_pauses_at_once() -> None:
    machine = Machine(settings=Settings())
    decision = machine.tick(touch=True)
    assert (decision.level, decision.cause) == (Level.PAUSED, Cause.OWNER_ACTIVE)


def test_track_is_idempotent() -> None:
    host = replace(HOST, owner_cpu_percent=90, max_temperature_c=99)
    once = track(Since(), NOW, OFFICE, ACTIVE, host)
    assert track(once, NOW, OFFICE, ACTIVE, host) == once
    assert once.input_since == ACTIVE.last_input
    assert once.load_crossing_since == NOW
    assert once.hot


def test_naive_times_are_refused() -> None:
    naive = datetime(2025, 1, 6, 10)
    with pytest.raises(ValueError, match="now"):
        track(Since(), naive, OFFICE, IDLE, HOST)
    with pytest.raises(ValueError, match="now"):
        decide(naive, OFFICE, FleetPolicy(), IDLE, HOST, Since())
    with pytest.raises(ValueError, match="last_input"):
        track(Since(), NOW, OFFICE, ActivityReading(last_input=naive), HOST)


def test_adjacent_windows_with_the_same_caps_change_only_the_wording() -> None:
    settings = Settings(
        schedule=(
            DonationWindow(Window(frozenset({Weekday.MON}), time(9), time(12))),
            DonationWindow(Window(frozenset({Weekday.MON}), time(12), time(14))),
        )
    )
    decision = decide(NOW, settings, FleetPolicy(), IDLE, HOST, Since())
    assert decision.reason == "Donating up to 100 % CPU — until 12:00"
    assert decision.next_change == at(0, 12)


def test_daylight_saving_days_always_look_ahead() -> None:
    berlin = ZoneInfo("Europe/Berlin")  # Debian's tzdata, installed by scripts/bootstrap
    settings = Settings(
        schedule=(
            DonationWindow(Window(EVERY_DAY, time(2), time(3), "the hour that may not exist")),
            DonationWindow(Window(EVERY_DAY, time(22), time(1, 30), "nights")),
        )
    )
    for day in (datetime(2025, 3, 29, tzinfo=berlin), datetime(2025, 10, 25, tzinfo=berlin)):
        for minutes in range(0, 48 * 60, 7):
            now = (day.astimezone(UTC) + timedelta(minutes=minutes)).astimezone(berlin)
            activity = ActivityReading(last_input=(now - 30 * SECOND).astimezone(UTC))
            since = track(Since(), now, settings, activity, HOST)
            decision = decide(now, settings, FleetPolicy(), activity, HOST, since)
            assert decision.next_change is None or decision.next_change > now


def test_snooze_until_resumed_has_its_own_reason_and_ends_only_at_its_end():
    settings = replace(Settings(), snooze_until=NOW + timedelta(days=36500))
    since = track(Since(), NOW, settings, IDLE, HOST)
    decision = decide(NOW, settings, FleetPolicy(), IDLE, HOST, since)
    assert decision.cause is Cause.SNOOZED
    assert decision.reason == "Paused until you resume donating"
    assert decision.next_change == settings.snooze_until
