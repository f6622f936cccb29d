"""The owner's donation settings: caps, weekly schedule, limits, snooze.

Everything is an immutable value. The aggregate roots (`Settings` here, `FleetPolicy` in
`fleet.py`) validate themselves on construction, so an invalid tree never reaches the
policy; the parts (`Limits`, `Window`, …) offer `validate(path)` so that an error names
the full field path ("schedule[1].caps.idle.cpu_percent") and the allowed range. The
field paths are the TOML keys of `donor_app.settings.config`.

Windows are wall-clock times in the owner's local time zone (the zone of the `now` given
to the policy). A window whose `end` is before its `start` crosses midnight: it starts
on each of its `days` and ends on the following day (Fri 22:00–06:00 ends Sat 06:00).
`end == start` is invalid (use two windows, or an empty schedule, for "all day").
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta
from enum import IntEnum
from itertools import combinations

WEEK = timedelta(days=7)
DAY = timedelta(days=1)

MAX_DURATION = timedelta(days=366)
"""The longest duration a setting takes. Longer means "never" in practice, and every
deadline the policy adds one to stays far inside what a datetime can hold."""

MAX_WINDOWS = 7 * 24
"""The most windows a schedule or the fleet's blackout may have: one per hour of the
week, more than the tray's grid can draw. The overlap check's cost grows with their
square, and a settings file is read again while the agent runs."""

MAX_MIB = 64 * 1024 * 1024
"""The largest memory cap in MiB (64 TiB, more than any machine lends)."""

MAX_SNOOZE = timedelta(days=366)
"""The longest snooze with an end. The agent's Snooze call takes nothing longer, and the
settings file holds nothing longer except a snooze "until I resume"."""

SNOOZE_FOREVER = timedelta(days=365 * 100)
"""How far ahead a snooze "until I resume" is written: an end nobody lives to see."""

SNOOZE_UNTIL_RESUMED = timedelta(days=365 * 50)
"""A snooze ending further ahead than this is one "until I resume" (so one written
decades ago still is)."""

# A settings file is read after it was written; a clock set back in between must not
# turn a snooze the agent wrote into an error.
_CLOCK_SLACK = DAY


class FieldError(ValueError):
    """A setting is out of range; `path` is its dotted field path (also its TOML key)."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class Weekday(IntEnum):
    """Days as `datetime.weekday()` numbers them (Monday is 0)."""

    MON = 0
    TUE = 1
    WED = 2
    THU = 3
    FRI = 4
    SAT = 5
    SUN = 6

    @property
    def short(self) -> str:
        """The English short name ("Mon"), independent of the locale."""
        return self.name.capitalize()


EVERY_DAY = frozenset(Weekday)
WORKDAYS = frozenset({Weekday.MON, Weekday.TUE, Weekday.WED, Weekday.THU, Weekday.FRI})


@dataclass(frozen=True, slots=True)
class Window:
    """A weekly wall-clock window: on each of `days`, from `start` until `end`.

    `end < start` means the window crosses midnight and ends on the next day.
    `label` is shown to the owner ("office hours until 17:00").
    """

    days: frozenset[Weekday]
    start: time
    end: time
    label: str = ""

    def validate(self, path: str) -> None:
        """Raise `FieldError` naming `path` if the window is malformed."""
        if not self.days:
            raise FieldError(f"{path}.days", "must name at least one day (mon … sun)")
        for name, value in (("start", self.start), ("end", self.end)):
            if value.tzinfo is not None:
                raise FieldError(f"{path}.{name}", "must be a local wall-clock time")
        if self.start == self.end:
            raise FieldError(
                f"{path}.end",
                "must differ from start (an end before the start crosses midnight)",
            )

    @property
    def length(self) -> timedelta:
        """How long each occurrence lasts (under 24 h)."""
        length = _since_midnight(self.end) - _since_midnight(self.start)
        return length if length > timedelta(0) else length + DAY

    def spans(self) -> tuple[tuple[timedelta, timedelta], ...]:
        """Each occurrence as (start, end) offsets from Monday 00:00, sorted.

        Starts lie in [0, 7 days); an end may pass 7 days (Sunday night into Monday).
        """
        start = _since_midnight(self.start)
        return tuple(
            (day * DAY + start, day * DAY + start + self.length) for day in sorted(self.days)
        )

    def describe(self) -> str:
        """Human form, e.g. "Mon, Tue 09:00–17:00"."""
        days = ", ".join(day.short for day in sorted(self.days))
        return f"{days} {self.start:%H:%M}–{self.end:%H:%M}"


def check_no_overlap(windows: tuple[Window, ...], path: str) -> None:
    """Raise `FieldError` for the first window (as `path[i]`) that overlaps an earlier one,
    or naming `path` if there are more than `MAX_WINDOWS`.

    Windows that only touch (one ends when the next starts) do not overlap.
    """
    if len(windows) > MAX_WINDOWS:
        raise FieldError(path, f"has {len(windows)} windows; at most {MAX_WINDOWS}")
    spans = [(index, span) for index, window in enumerate(windows) for span in window.spans()]
    for (first, (a_start, a_end)), (second, (b_start, b_end)) in combinations(spans, 2):
        if first != second and any(
            a_start < b_end + shift and b_start + shift < a_end for shift in _SHIFTS
        ):
            later, earlier = max(first, second), min(first, second)
            raise FieldError(
                f"{path}[{later}]",
                f"overlaps {path}[{earlier}] ({windows[earlier].describe()}); "
                "windows must not overlap",
            )


# Offsets compared a week apart: the week is a circle.
_SHIFTS = (-WEEK, timedelta(0), WEEK)


def _since_midnight(value: time) -> timedelta:
    return timedelta(
        hours=value.hour, minutes=value.minute, seconds=value.second, microseconds=value.microsecond
    )


@dataclass(frozen=True, slots=True)
class Limits:
    """How much of the host the guests may use in one situation.

    `cpu_percent` is a share of the whole host (all cores), 0–100. Memory is capped by
    `memory_mib`, by `memory_percent` of the host's RAM, or by both (the smaller wins);
    at least one must be set.
    """

    cpu_percent: float
    memory_mib: int | None = None
    memory_percent: float | None = None

    def validate(self, path: str) -> None:
        """Raise `FieldError` naming `path.<field>` for a value out of range."""
        check_percent(f"{path}.cpu_percent", self.cpu_percent)
        if self.memory_mib is None and self.memory_percent is None:
            raise FieldError(path, "needs memory_mib or memory_percent (or both)")
        if self.memory_mib is not None:
            check_mib(f"{path}.memory_mib", self.memory_mib)
        if self.memory_percent is not None:
            check_percent(f"{path}.memory_percent", self.memory_percent)

    def memory_for(self, total_mib: int) -> int:
        """The memory cap in MiB on a host with `total_mib` of RAM (never above it)."""
        bounds = [total_mib]
        if self.memory_mib is not None:
            bounds.append(self.memory_mib)
        if self.memory_percent is not None:
            bounds.append(int(total_mib * self.memory_percent / 100))
        return max(0, min(bounds))


@dataclass(frozen=True, slots=True)
class Caps:
    """The limits while the owner uses the machine and while it is idle."""

    in_use: Limits
    idle: Limits

    def validate(self, path: str) -> None:
        """Raise `FieldError` naming `path.in_use.*` or `path.idle.*`."""
        self.in_use.validate(f"{path}.in_use")
        self.idle.validate(f"{path}.idle")


# Default: lend everything while idle (half the RAM), get out of the way (pause) at once
# when the owner is active.
DEFAULT_CAPS = Caps(
    in_use=Limits(cpu_percent=0.0, memory_percent=50.0),
    idle=Limits(cpu_percent=100.0, memory_percent=50.0),
)


@dataclass(frozen=True, slots=True)
class DonationWindow:
    """A schedule entry: donating is allowed during `window`, with `caps` (None: the
    settings' default caps)."""

    window: Window
    caps: Caps | None = None

    def validate(self, path: str) -> None:
        """Raise `FieldError`; the window's fields share `path` (flat, like the TOML)."""
        self.window.validate(path)
        if self.caps is not None:
            self.caps.validate(f"{path}.caps")


@dataclass(frozen=True, slots=True)
class OwnerLoadLimit:
    """Pause when the owner's own CPU load (host minus guests) stays high.

    Pause once it has been above `pause_above_percent` for `pause_after`; resume only
    after it has stayed below `resume_below_percent` for `resume_after` (hysteresis, so
    a load near the threshold does not make the guests flap).
    """

    pause_above_percent: float = 25.0
    pause_after: timedelta = timedelta(seconds=10)
    resume_below_percent: float = 15.0
    resume_after: timedelta = timedelta(seconds=30)

    def validate(self, path: str) -> None:
        """Raise `FieldError` naming `path.<field>`."""
        check_percent(f"{path}.pause_above_percent", self.pause_above_percent)
        check_percent(f"{path}.resume_below_percent", self.resume_below_percent)
        if self.resume_below_percent > self.pause_above_percent:
            raise FieldError(
                f"{path}.resume_below_percent",
                f"must be ≤ pause_above_percent ({self.pause_above_percent:g}), "
                f"got {self.resume_below_percent:g}",
            )
        check_duration(f"{path}.pause_after", self.pause_after)
        check_duration(f"{path}.resume_after", self.resume_after)


MAX_TEMPERATURE_RANGE_C = (0.0, 150.0)


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything the owner sets. Validated on construction (raises `FieldError`).

    `schedule` empty means "any time": donating is allowed around the clock with `caps`.
    Otherwise donating is allowed only inside a window, with the window's caps (or
    `caps` when it has none). The defaults donate whenever the machine is idle and pause
    the moment the owner is active.

    `idle_after`: no input for this long and the machine counts as idle again.
    `evacuate_after` / `checkpoint_after`: how long the owner's continuous activity must
    last before the guests are moved away / saved to disk (both counted from the start
    of the activity; a `checkpoint_after` ≤ `evacuate_after` skips evacuation). Activity
    is input without a gap of `idle_after`, or the owner's own CPU load staying high.
    `snooze_until`: no donating before this moment (timezone-aware). How far ahead it
    may lie depends on when it is read, so `check_snooze` checks it where a clock is.
    """

    enabled: bool = True
    caps: Caps = DEFAULT_CAPS
    schedule: tuple[DonationWindow, ...] = ()
    idle_after: timedelta = timedelta(seconds=180)
    evacuate_after: timedelta = timedelta(seconds=120)
    checkpoint_after: timedelta = timedelta(seconds=600)
    owner_load: OwnerLoadLimit = OwnerLoadLimit()
    pause_on_battery: bool = True
    pause_on_heat: bool = True
    max_temperature_c: float = 85.0
    snooze_until: datetime | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise `FieldError` for the first invalid field."""
        self.caps.validate("caps")
        for index, entry in enumerate(self.schedule):
            entry.validate(f"schedule[{index}]")
        check_no_overlap(tuple(entry.window for entry in self.schedule), "schedule")
        for name in ("idle_after", "evacuate_after", "checkpoint_after"):
            check_duration(name, getattr(self, name))
        self.owner_load.validate("owner_load")
        low, high = MAX_TEMPERATURE_RANGE_C
        if not low <= self.max_temperature_c <= high:
            raise FieldError(
                "max_temperature_c",
                f"must be within {low:g}–{high:g} °C, got {self.max_temperature_c:g}",
            )
        if self.snooze_until is not None and self.snooze_until.utcoffset() is None:
            raise FieldError("snooze_until", "must be timezone-aware (include a UTC offset)")

    def caps_of(self, entry: DonationWindow | None) -> Caps:
        """The caps in force inside `entry` (None: outside the schedule or no schedule)."""
        if entry is not None and entry.caps is not None:
            return entry.caps
        return self.caps


def check_percent(path: str, value: float) -> None:
    """Raise `FieldError` unless 0 ≤ `value` ≤ 100."""
    # Written so that NaN fails too.
    if not 0 <= value <= 100:
        raise FieldError(path, f"must be within 0–100 %, got {value:g}")


def check_mib(path: str, value: int) -> None:
    """Raise `FieldError` unless 0 ≤ `value` ≤ `MAX_MIB`."""
    if value < 0:
        raise FieldError(path, f"must be ≥ 0 MiB, got {value}")
    if value > MAX_MIB:
        # The value is not shown: it may have more digits than Python writes out.
        raise FieldError(path, f"must be ≤ {MAX_MIB} MiB ({MAX_MIB >> 20} TiB)")


def check_duration(path: str, value: timedelta) -> None:
    """Raise `FieldError` unless 0 ≤ `value` ≤ `MAX_DURATION`."""
    if not timedelta(0) <= value <= MAX_DURATION:
        raise FieldError(
            path,
            f"must be ≥ 0 seconds and at most {MAX_DURATION.days} days, "
            f"got {value.total_seconds():g}",
        )


def check_snooze(path: str, until: datetime, now: datetime) -> None:
    """Raise `FieldError` unless a snooze may end at `until` (timezone-aware) when read
    at `now`: a snooze that is over, one at most `MAX_SNOOZE` ahead, or one "until I
    resume" (more than `SNOOZE_UNTIL_RESUMED` and at most `SNOOZE_FOREVER` ahead)."""
    ahead = until - now
    if not (
        ahead <= MAX_SNOOZE + _CLOCK_SLACK
        or SNOOZE_UNTIL_RESUMED < ahead <= SNOOZE_FOREVER + _CLOCK_SLACK
    ):
        raise FieldError(
            path,
            f"must be at most {MAX_SNOOZE.days} days ahead (a pause until you resume is "
            f"written {SNOOZE_FOREVER.days // 365} years ahead), got {until.isoformat()}",
        )
    if not _in_utc_range(until):  # only a moment long over gets here
        raise FieldError(path, f"must lie in the years 1–9999 in UTC, got {until.isoformat()}")


def _in_utc_range(moment: datetime) -> bool:
    """Whether `moment` has a UTC time (9999-12-31T23:00-05:00 is in year 10000 there)."""
    try:
        moment.astimezone(UTC)
    except OverflowError:
        return False
    return True
