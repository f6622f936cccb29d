"""The owner's settings file (``settings.toml``): reading it into `Settings`, writing it back.

The format is documented in `donor_app.settings.config`. `load_settings` gives the
defaults for a missing file; `save_settings` replaces the file atomically, so a crash
leaves the old or the new settings.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from datetime import UTC, datetime, time, timedelta
from pathlib import Path

from donor_app.atomic_file import write_atomic
from donor_app.domain.settings import (
    Caps,
    DonationWindow,
    Limits,
    OwnerLoadLimit,
    Settings,
    check_snooze,
)
from donor_app.settings.toml_reader import Table, read_toml, read_window, validated

_DEFAULT_SETTINGS = Settings()
_DEFAULT_LOAD = OwnerLoadLimit()


def load_settings(file: Path, *, now: datetime | None = None) -> Settings:
    """The owner's settings from `file` (defaults if it does not exist), read at `now`
    (default: the system clock)."""
    data = read_toml(file)
    return _DEFAULT_SETTINGS if data is None else parse_settings(data, file, now=now)


def parse_settings(
    data: Mapping[str, object], file: Path, *, now: datetime | None = None
) -> Settings:
    """Settings from parsed TOML; `file` is only named in errors. `now` (default: the
    system clock) bounds `snooze_until` as the Snooze call is bounded."""
    root = Table(file, data)
    caps = _caps(root.table("caps"), _DEFAULT_SETTINGS.caps)
    schedule = tuple(_donation_window(entry, caps) for entry in root.tables("schedule"))
    enabled = root.boolean("enabled", _DEFAULT_SETTINGS.enabled)
    idle_after = root.seconds("idle_after", _DEFAULT_SETTINGS.idle_after)
    evacuate_after = root.seconds("evacuate_after", _DEFAULT_SETTINGS.evacuate_after)
    checkpoint_after = root.seconds("checkpoint_after", _DEFAULT_SETTINGS.checkpoint_after)
    owner_load = _owner_load(root.table("owner_load"))
    pause_on_battery = root.boolean("pause_on_battery", _DEFAULT_SETTINGS.pause_on_battery)
    pause_on_heat = root.boolean("pause_on_heat", _DEFAULT_SETTINGS.pause_on_heat)
    max_temperature = root.number("max_temperature_c", _DEFAULT_SETTINGS.max_temperature_c)
    snooze_until = root.moment("snooze_until")
    root.done()

    def build() -> Settings:
        settings = Settings(
            enabled=enabled,
            caps=caps,
            schedule=schedule,
            idle_after=idle_after,
            evacuate_after=evacuate_after,
            checkpoint_after=checkpoint_after,
            owner_load=owner_load,
            pause_on_battery=pause_on_battery,
            pause_on_heat=pause_on_heat,
            max_temperature_c=max_temperature,
            snooze_until=snooze_until,
        )
        if snooze_until is not None:  # timezone-aware: Settings checked that
            check_snooze("snooze_until", snooze_until, now or datetime.now(UTC))
        return settings

    return validated(file, build)


def _caps(table: Table | None, base: Caps) -> Caps:
    if table is None:
        return base
    caps = Caps(
        in_use=_limits(table.table("in_use"), base.in_use),
        idle=_limits(table.table("idle"), base.idle),
    )
    table.done()
    return caps


def _limits(table: Table | None, base: Limits) -> Limits:
    if table is None:
        return base
    cpu = table.number("cpu_percent", base.cpu_percent)
    mib = table.optional_integer("memory_mib")
    percent = table.optional_number("memory_percent")
    table.done()
    if mib is None and percent is None:
        # The two memory keys form one cap: inherit them together or not at all.
        mib, percent = base.memory_mib, base.memory_percent
    return Limits(cpu_percent=cpu, memory_mib=mib, memory_percent=percent)


def _owner_load(table: Table | None) -> OwnerLoadLimit:
    if table is None:
        return _DEFAULT_LOAD
    limit = OwnerLoadLimit(
        pause_above_percent=table.number("pause_above_percent", _DEFAULT_LOAD.pause_above_percent),
        pause_after=table.seconds("pause_after", _DEFAULT_LOAD.pause_after),
        resume_below_percent=table.number(
            "resume_below_percent", _DEFAULT_LOAD.resume_below_percent
        ),
        resume_after=table.seconds("resume_after", _DEFAULT_LOAD.resume_after),
    )
    table.done()
    return limit


def _donation_window(table: Table, default_caps: Caps) -> DonationWindow:
    window = read_window(table)
    caps_table = table.table("caps")
    entry = DonationWindow(window, None if caps_table is None else _caps(caps_table, default_caps))
    table.done()
    return entry


# --- writing --------------------------------------------------------------------------


def dump_settings(settings: Settings) -> str:
    """`settings` as TOML that `parse_settings` reads back equal (every key written)."""
    root: list[tuple[str, object]] = [
        ("enabled", settings.enabled),
        ("idle_after", settings.idle_after),
        ("evacuate_after", settings.evacuate_after),
        ("checkpoint_after", settings.checkpoint_after),
        ("pause_on_battery", settings.pause_on_battery),
        ("pause_on_heat", settings.pause_on_heat),
        ("max_temperature_c", settings.max_temperature_c),
    ]
    if settings.snooze_until is not None:
        root.append(("snooze_until", settings.snooze_until))
    load = settings.owner_load
    lines = [
        "# donor_app settings; the format is described in donor_app/settings/config.py",
        *_assignments(root),
        "",
        "[owner_load]",
        *_assignments(
            [
                ("pause_above_percent", load.pause_above_percent),
                ("pause_after", load.pause_after),
                ("resume_below_percent", load.resume_below_percent),
                ("resume_after", load.resume_after),
            ]
        ),
        *_caps_lines("caps", settings.caps),
    ]
    for entry in settings.schedule:
        window = entry.window
        lines += [
            "",
            "[[schedule]]",
            *_assignments(
                [
                    ("label", window.label),
                    ("days", [day.name.lower() for day in sorted(window.days)]),
                    ("start", window.start),
                    ("end", window.end),
                ]
            ),
        ]
        if entry.caps is not None:
            lines += _caps_lines("schedule.caps", entry.caps)
    return "\n".join(lines) + "\n"


def save_settings(settings: Settings, file: Path) -> None:
    """Write `settings` to `file` (mode 0600, its directory created if need be)
    atomically: a crash leaves the old or the new file."""
    file.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(file, dump_settings(settings).encode("utf-8"), 0o600)


def _caps_lines(prefix: str, caps: Caps) -> Iterator[str]:
    for situation, limits in (("in_use", caps.in_use), ("idle", caps.idle)):
        yield ""
        yield f"[{prefix}.{situation}]"
        values: list[tuple[str, object]] = [("cpu_percent", limits.cpu_percent)]
        if limits.memory_mib is not None:
            values.append(("memory_mib", limits.memory_mib))
        if limits.memory_percent is not None:
            values.append(("memory_percent", limits.memory_percent))
        yield from _assignments(values)


def _assignments(pairs: list[tuple[str, object]]) -> Iterator[str]:
    for key, value in pairs:
        yield f"{key} = {_toml_value(value)}"


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, timedelta):
        return _toml_seconds(value)
    if isinstance(value, datetime):
        offset = value.utcoffset()
        # TOML offsets have whole minutes; anything finer is written in UTC.
        if offset is None or offset % timedelta(minutes=1):
            value = value.astimezone(UTC)
        return value.isoformat()
    if isinstance(value, time):
        spec = "minutes" if not (value.second or value.microsecond) else "auto"
        return _toml_string(value.isoformat(timespec=spec))
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def _toml_seconds(value: timedelta) -> str:
    if value.microseconds:
        return repr(value.total_seconds())
    return str(value.days * 86_400 + value.seconds)  # exact, unlike total_seconds()


def _toml_string(text: str) -> str:
    escaped = []
    for char in text:
        if char in '"\\':
            escaped.append("\\" + char)
        elif char < " " or char == "\x7f":
            escaped.append(f"\\u{ord(char):04x}")
        else:
            escaped.append(char)
    return '"' + "".join(escaped) + '"'
