"""The donation policy: from settings, fleet bounds and readings to a `Decision`.

Pure functions of their inputs; `now` is a parameter. The engine keeps one `Since` and,
every tick and on every input event, does::

    since = track(since, now, settings, activity, host)
    decision = decide(now, settings, fleet, activity, host, since)

`track` carries what needs memory between ticks (since when the owner has been busy, the
hysteresis of the owner-load and heat pauses); `decide` reads it.

Precedence, strongest first (the first that applies gives the cause and the reason):

1. The escalation ladder: once the owner's activity has lasted `checkpoint_after` →
   CHECKPOINT, `evacuate_after` → EVACUATE, whatever else holds — it frees the owner's
   machine, which every pause reason wants too. Activity is input with no gap of
   `idle_after` (measured from its first to its latest input), or the owner's own CPU
   load being high (measured up to now).
2. Pauses: DISABLED, SNOOZED, BLACKOUT, SCHEDULE (outside every window), BATTERY, HEAT,
   OWNER_LOAD.
3. Recent input (within `idle_after`): THROTTLED at the in-use caps, PAUSED if they are
   zero.
4. Otherwise RUN at the idle caps (PAUSED, ZERO_CAP if they are zero).

The owner's settings are clamped to the fleet's bounds first, so no decision passes them.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import datetime, time, timedelta

from donor_app.domain.decision import Cause, Decision, EffectiveCaps, Level
from donor_app.domain.fleet import FleetPolicy, clamp
from donor_app.domain.readings import ActivityReading, HostReading
from donor_app.domain.schedule import find, next_boundary, next_start, occurrence_end
from donor_app.domain.settings import (
    SNOOZE_UNTIL_RESUMED,
    Caps,
    DonationWindow,
    OwnerLoadLimit,
    Settings,
    Weekday,
)

HEAT_HYSTERESIS_C = 5.0
"""Once paused for heat, resume only below `max_temperature_c` minus this."""

# Schedules repeat weekly, so a change that does not come within 8 days of the last
# timer (snooze end) never comes.
_HORIZON = timedelta(days=8)
_MAX_STEPS = 10_000  # a guard; the horizon ends the search long before


@dataclass(frozen=True, slots=True)
class Since:
    """State carried from one tick to the next; start with `Since()`.

    `input_since`: the first input of the owner's current stretch of input (no gap of
    `idle_after` in it), None while there is no recent input. `last_input`: the input
    time seen at the last tick (a jump of `idle_after` or more means the owner was away
    in between, e.g. while the machine slept). `load_high`: the owner-load pause is on;
    `load_since`: since when the owner's load has been above the pause threshold, while
    `load_high`. `load_crossing_since`: since when the load has been past the threshold
    that would flip `load_high`. `hot`: the heat pause is on.

    Every field is a moment or a flag derived from readings, so tracking with the same
    readings lands in the same state whether the engine ticked in between or not.
    """

    input_since: datetime | None = None
    last_input: datetime | None = None
    load_high: bool = False
    load_since: datetime | None = None
    load_crossing_since: datetime | None = None
    hot: bool = False


def track(
    prev: Since,
    now: datetime,
    settings: Settings,
    activity: ActivityReading,
    host: HostReading,
) -> Since:
    """Advance `prev` to `now` with the latest readings. Idempotent for the same `now`."""
    _require_aware(now, activity)
    recent = _recent_input(now, settings, activity)
    load_high, load_since, crossing_since = _track_load(prev, now, settings.owner_load, host)
    return Since(
        input_since=_track_input(prev, settings, recent),
        last_input=activity.last_input,
        load_high=load_high,
        load_since=load_since,
        load_crossing_since=crossing_since,
        hot=_track_heat(prev.hot, settings, host),
    )


def decide(  # noqa: PLR0917 - six inputs, each named in the engine's one call
    now: datetime,
    settings: Settings,
    fleet_policy: FleetPolicy,
    activity: ActivityReading,
    host: HostReading,
    since: Since,
) -> Decision:
    """The decision for `now`; `since` must come from `track(…, now, …)`.

    `now` must be timezone-aware and in the owner's local zone: schedule windows are
    read on its wall clock.
    """
    _require_aware(now, activity)
    world = _World(clamp(settings, fleet_policy), fleet_policy, activity, host)
    current = _evaluate(now, world, since)
    return replace(current, next_change=_next_change(now, current, world, since))


def caps_at(now: datetime, settings: Settings, fleet_policy: FleetPolicy) -> Caps:
    """The caps in force at `now` (the window's or the default ones), within the fleet's
    bounds; outside the schedule, the default caps."""
    settings = clamp(settings, fleet_policy)
    return settings.caps_of(_window_at(now, settings))


@dataclass(frozen=True, slots=True)
class _World:
    """The inputs that stay fixed while `_next_change` looks ahead."""

    settings: Settings  # clamped to the fleet's bounds
    fleet: FleetPolicy
    activity: ActivityReading
    host: HostReading


def _evaluate(now: datetime, world: _World, since: Since) -> Decision:
    """The decision without `next_change`."""
    settings, host = world.settings, world.host
    entry = _window_at(now, settings)
    caps = settings.caps_of(entry)
    recent = _recent_input(now, settings, world.activity)

    busy_for = _busy_for(now, since, recent)
    if busy_for is not None:
        busy = Cause.OWNER_ACTIVE if recent is not None else Cause.OWNER_LOAD
        doing = _DOING[busy]
        if busy_for >= settings.checkpoint_after:
            freed = EffectiveCaps(cpu_percent=0.0, memory_mib=0)
            return Decision(Level.CHECKPOINT, busy, freed, f"Saving the guest to disk — {doing}")
        if busy_for >= settings.evacuate_after:
            reason = f"Moving the guest to another computer — {doing}"
            return Decision(Level.EVACUATE, busy, _stopped(caps, host), reason)

    pause = _pause(now, world, since, entry)
    if pause is not None:
        cause, reason = pause
        return Decision(Level.PAUSED, cause, _stopped(caps, host), reason)
    return _donate(now, recent is not None, caps, host, entry)


def _busy_for(now: datetime, since: Since, recent: datetime | None) -> timedelta | None:
    """How long the owner has been busy so far, None if they are not busy.

    Input counts up to the latest input, not up to now: one touch of the mouse is no
    stretch of work, and must not make the guests move away two minutes later. A high
    own load counts up to now.
    """
    spans = []
    if recent is not None and since.input_since is not None:
        spans.append(recent - since.input_since)
    if since.load_high and since.load_since is not None:
        spans.append(now - since.load_since)
    return max(spans, default=None)


_DOING = {
    Cause.OWNER_ACTIVE: "you are using this computer",
    Cause.OWNER_LOAD: "your programs are busy",
}


def _stopped(caps: Caps, host: HostReading) -> EffectiveCaps:
    """A stopped guest keeps its RAM up to the in-use cap: something wants the machine."""
    return EffectiveCaps(cpu_percent=0.0, memory_mib=caps.in_use.memory_for(host.total_memory_mib))


def _pause(
    now: datetime, world: _World, since: Since, entry: DonationWindow | None
) -> tuple[Cause, str] | None:
    """The strongest reason not to donate at all, or None."""
    settings, fleet = world.settings, world.fleet
    if not settings.enabled:
        return Cause.DISABLED, "Paused — donating is switched off"
    if settings.snooze_until is not None and now < settings.snooze_until:
        if settings.snooze_until - now > SNOOZE_UNTIL_RESUMED:
            return Cause.SNOOZED, "Paused until you resume donating"
        return Cause.SNOOZED, f"Snoozed until {_when(settings.snooze_until, now)}"
    blackout = find(fleet.blackout, now)
    if blackout is not None:
        window = fleet.blackout[blackout]
        what = window.label or "blocked by your administrator"
        return Cause.BLACKOUT, f"Paused — {what}{_until(occurrence_end(window, now), now)}"
    if settings.schedule and entry is None:
        opens = next_start([e.window for e in settings.schedule], now)
        return Cause.SCHEDULE, f"Outside donation hours —{_until(opens, now)}"
    if settings.pause_on_battery and world.host.on_battery:
        return Cause.BATTERY, "Paused — on battery"
    if since.hot:
        temperature = world.host.max_temperature_c
        shown = f" ({temperature:.0f} °C)" if temperature is not None else ""
        return Cause.HEAT, f"Paused — too hot{shown}"
    if since.load_high:
        return Cause.OWNER_LOAD, f"Paused — {_DOING[Cause.OWNER_LOAD]}"
    return None


def _donate(
    now: datetime, active: bool, caps: Caps, host: HostReading, entry: DonationWindow | None
) -> Decision:
    """THROTTLED at the in-use caps if the owner is `active`, else RUN at the idle caps;
    PAUSED if those leave nothing to donate."""
    limits = caps.in_use if active else caps.idle
    given = EffectiveCaps(float(limits.cpu_percent), limits.memory_for(host.total_memory_mib))
    if given.cpu_percent == 0 or given.memory_mib == 0:
        if active:
            reason = f"Paused — {_DOING[Cause.OWNER_ACTIVE]}"
            return Decision(Level.PAUSED, Cause.OWNER_ACTIVE, _stopped(caps, host), reason)
        zero = "0 % CPU" if given.cpu_percent == 0 else "0 MiB of memory"
        held = replace(given, cpu_percent=0.0)
        return Decision(Level.PAUSED, Cause.ZERO_CAP, held, f"Paused — the limit is {zero}")
    if entry is None:
        context = _DOING[Cause.OWNER_ACTIVE] if active else "this computer is idle"
    else:
        until = _until(occurrence_end(entry.window, now), now)
        context = f"{entry.window.label}{until}" if entry.window.label else until.lstrip()
    cpu = f"{given.cpu_percent:g} % CPU"
    if active:
        return Decision(Level.THROTTLED, Cause.OWNER_ACTIVE, given, f"Limited to {cpu} — {context}")
    return Decision(Level.RUN, Cause.IDLE, given, f"Donating up to {cpu} — {context}")


def _next_change(now: datetime, current: Decision, world: _World, since: Since) -> datetime | None:
    """The first moment after `now` at which, with the same readings, the decision differs.

    Steps through the moments where something can change (timers, window edges,
    midnight for the reason's "until" wording) and evaluates each; a window edge where
    the next window has the same caps and wording is not a change.
    """
    settings = world.settings
    # Calendar moments (midnights, window edges) only within the horizon: timers such as
    # a snooze's end are yielded whatever their distance, so a long snooze costs one step
    # instead of a walk through every midnight until it ends.
    horizon = now + _HORIZON
    at, state = now, since
    for _ in range(_MAX_STEPS):
        later = [moment for moment in _moments(at, world, state, horizon) if moment > at]
        if not later:
            return None
        at = min(later).astimezone(now.tzinfo)
        state = track(state, at, settings, world.activity, world.host)
        if not _evaluate(at, world, state).same_state(current):
            return at
    return None


def _moments(at: datetime, world: _World, state: Since, horizon: datetime) -> Iterator[datetime]:
    """Candidate change moments (some may lie before `at`; the caller filters)."""
    settings = world.settings
    if settings.snooze_until is not None:
        yield settings.snooze_until
    recent = _recent_input(at, settings, world.activity)
    if recent is not None:
        yield recent + settings.idle_after
    # Input-driven activity only grows with new input, so only load escalates by waiting.
    if state.load_high and state.load_since is not None:
        yield state.load_since + settings.evacuate_after
        yield state.load_since + settings.checkpoint_after
    if state.load_crossing_since is not None:
        limit = settings.owner_load
        wait = limit.resume_after if state.load_high else limit.pause_after
        yield state.load_crossing_since + wait
    if at < horizon:
        local = at.replace(tzinfo=None)
        yield datetime.combine(local.date() + timedelta(days=1), time()).replace(tzinfo=at.tzinfo)
        for windows in ([e.window for e in settings.schedule], world.fleet.blackout):
            edge = next_boundary(windows, at)
            if edge is not None:
                yield edge


def _window_at(now: datetime, settings: Settings) -> DonationWindow | None:
    index = find([entry.window for entry in settings.schedule], now)
    return None if index is None else settings.schedule[index]


def _recent_input(now: datetime, settings: Settings, activity: ActivityReading) -> datetime | None:
    """The last input if it is recent enough for the owner to count as active."""
    last = activity.last_input
    return last if last is not None and now - last < settings.idle_after else None


def _track_input(prev: Since, settings: Settings, recent: datetime | None) -> datetime | None:
    if recent is None:
        return None
    # No input seen for idle_after between two ticks: the owner was away in between
    # (the machine slept, the engine stalled), so a new stretch begins.
    away = prev.last_input is not None and recent - prev.last_input >= settings.idle_after
    if prev.input_since is None or away:
        return recent
    return prev.input_since


def _track_load(
    prev: Since, now: datetime, limit: OwnerLoadLimit, host: HostReading
) -> tuple[bool, datetime | None, datetime | None]:
    """(load_high, load_since, load_crossing_since) after this tick."""
    load = host.owner_cpu_percent
    if prev.load_high:
        crossing, wait = load < limit.resume_below_percent, limit.resume_after
    else:
        crossing, wait = load > limit.pause_above_percent, limit.pause_after
    if not crossing:
        return prev.load_high, prev.load_since, None
    started = prev.load_crossing_since or now
    if now - started < wait:
        return prev.load_high, prev.load_since, started
    # Flipped. A high load counts from when it went above the threshold, not from when
    # the wait confirmed it, so the result is the same however the ticks fell.
    return (False, None, None) if prev.load_high else (True, started, None)


def _track_heat(was_hot: bool, settings: Settings, host: HostReading) -> bool:
    temperature = host.max_temperature_c
    if temperature is None or not settings.pause_on_heat:
        return False  # no sensor, or the owner does not want heat pauses
    if was_hot:
        return temperature >= settings.max_temperature_c - HEAT_HYSTERESIS_C
    return temperature > settings.max_temperature_c


def _until(moment: datetime | None, now: datetime) -> str:
    return f" until {_when(moment, now)}" if moment is not None else ""


def _when(moment: datetime, now: datetime) -> str:
    """`moment` for the owner: "15:00" today, "Mon 18:00" within the week, else
    "2025-03-01 18:00" (in the zone of `now`)."""
    local = moment.astimezone(now.tzinfo)
    days = (local.date() - now.date()).days
    if days == 0:
        return f"{local:%H:%M}"
    if 0 < days < 7:
        return f"{Weekday(local.weekday()).short} {local:%H:%M}"
    return f"{local:%Y-%m-%d %H:%M}"


def _require_aware(now: datetime, activity: ActivityReading) -> None:
    if now.utcoffset() is None:
        raise ValueError("now: must be timezone-aware")
    if activity.last_input is not None and activity.last_input.utcoffset() is None:
        raise ValueError("activity.last_input: must be timezone-aware")
