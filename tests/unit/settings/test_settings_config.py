"""TOML settings and fleet policy: round trips, the documented format, every kind of
mistake, atomic writes."""

from __future__ import annotations

import os
import textwrap
import tomllib
from datetime import UTC, datetime, time, timedelta, timezone
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from donor_app.domain.fleet import FleetPolicy
from donor_app.domain.settings import (
    MAX_MIB,
    MAX_SNOOZE,
    SNOOZE_FOREVER,
    SNOOZE_UNTIL_RESUMED,
    Caps,
    DonationWindow,
    FieldError,
    Limits,
    OwnerLoadLimit,
    Settings,
    Weekday,
    Window,
)
from donor_app.settings import config
from donor_app.settings.config import (
    ConfigError,
    dump_settings,
    load_fleet,
    load_settings,
    parse_fleet,
    parse_settings,
    save_settings,
)

FILE = Path("/etc/donor_app/test.toml")
NOW = datetime(2026, 3, 2, 12, tzinfo=UTC)  # when the round trips read their files


def parse(text: str) -> Settings:
    return parse_settings(tomllib.loads(textwrap.dedent(text)), FILE)


def documented_examples() -> list[str]:
    """The example files in the module docstring (the indented blocks after "::")."""
    examples = []
    for part in (config.__doc__ or "").split("::\n\n")[1:]:
        lines = []
        for line in part.splitlines():
            if line and not line.startswith("    "):
                break
            lines.append(line)
        examples.append(textwrap.dedent("\n".join(lines)))
    return examples


def test_the_documented_owner_file_parses() -> None:
    owner, _ = documented_examples()
    parsed = parse_settings(tomllib.loads(owner), FILE)
    office, nights = parsed.schedule
    assert office.window.label == "office hours"
    assert office.window.start == time(9)
    assert office.caps is not None
    assert office.caps.in_use == Limits(25, memory_percent=50)  # the rest inherited
    assert office.caps.idle == parsed.caps.idle
    assert (nights.window.start, nights.window.end, nights.caps) == (time(18), time(8), None)
    assert parsed.snooze_until == datetime(2025, 1, 6, 14, tzinfo=UTC)
    assert parsed.owner_load == OwnerLoadLimit()


def test_the_documented_fleet_file_parses() -> None:
    _, fleet_text = documented_examples()
    fleet = parse_fleet(tomllib.loads(fleet_text), FILE)
    assert fleet.max_cpu_percent == 50
    assert fleet.max_memory_percent == 50
    assert not fleet.owner_may_disable
    assert fleet.blackout[0].label == "nightly backups"


def test_an_empty_file_gives_the_defaults() -> None:
    assert parse("") == Settings()
    assert parse_fleet({}, FILE) == FleetPolicy()


def test_missing_files_give_the_defaults(tmp_path: Path) -> None:
    assert load_settings(tmp_path / "nope.toml") == Settings()
    assert load_fleet(tmp_path / "nope.toml") == FleetPolicy()


def test_one_memory_key_replaces_both_inherited_ones() -> None:
    parsed = parse(
        """
        [caps.idle]
        memory_mib = 4096
        """
    )
    assert parsed.caps.idle == Limits(100, memory_mib=4096)
    assert parsed.caps.in_use == Settings().caps.in_use


def test_times_may_be_toml_times_or_short_strings() -> None:
    parsed = parse(
        """
        [[schedule]]
        days = ["MON", "sun"]
        start = 07:30:00
        end = "9:05"
        """
    )
    window = parsed.schedule[0].window
    assert (window.start, window.end) == (time(7, 30), time(9, 5))
    assert window.days == {Weekday.MON, Weekday.SUN}


# --- round trips ---------------------------------------------------------------------

percents = st.floats(0, 100, allow_nan=False)
durations = st.timedeltas(timedelta(0), timedelta(days=30))
times = st.times()


@st.composite
def limits(draw: st.DrawFn) -> Limits:
    mib = draw(st.none() | st.integers(0, MAX_MIB))
    percent = draw(percents if mib is None else st.none() | percents)
    return Limits(draw(percents), memory_mib=mib, memory_percent=percent)


@st.composite
def schedules(draw: st.DrawFn) -> tuple[DonationWindow, ...]:
    # Windows on different days that end before noon cannot overlap.
    entries = []
    for day in draw(st.lists(st.sampled_from(Weekday), unique=True, max_size=3)):
        start, end = sorted(
            draw(st.lists(st.times(time(0), time(11)), min_size=2, max_size=2, unique=True))
        )
        caps = draw(st.none() | st.builds(Caps, limits(), limits()))
        entries.append(DonationWindow(Window(frozenset({day}), start, end, draw(labels)), caps))
    return tuple(entries)


labels = st.text(max_size=20)
zones = st.sampled_from(
    [UTC, timezone(timedelta(hours=-7)), timezone(timedelta(hours=5, minutes=45))]
)
# Every snooze a file may hold at NOW: over (however long ago), one with an end, and one
# "until I resume".
snoozes = st.builds(
    lambda ahead, zone: (NOW + ahead).astimezone(zone),
    st.timedeltas(timedelta(days=-3650), MAX_SNOOZE)
    | st.timedeltas(SNOOZE_UNTIL_RESUMED + timedelta(seconds=1), SNOOZE_FOREVER),
    zones,
)


@st.composite
def all_settings(draw: st.DrawFn) -> Settings:
    above = draw(percents)
    return Settings(
        enabled=draw(st.booleans()),
        caps=Caps(draw(limits()), draw(limits())),
        schedule=draw(schedules()),
        idle_after=draw(durations),
        evacuate_after=draw(durations),
        checkpoint_after=draw(durations),
        owner_load=OwnerLoadLimit(
            pause_above_percent=above,
            pause_after=draw(durations),
            resume_below_percent=draw(st.floats(0, above)),
            resume_after=draw(durations),
        ),
        pause_on_battery=draw(st.booleans()),
        pause_on_heat=draw(st.booleans()),
        max_temperature_c=draw(st.floats(0, 150)),
        snooze_until=draw(st.none() | snoozes),
    )


@given(all_settings())
def test_dump_then_parse_gives_equal_settings(original: Settings) -> None:
    assert parse_settings(tomllib.loads(dump_settings(original)), FILE, now=NOW) == original


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(all_settings())
def test_save_then_load_gives_equal_settings(tmp_path: Path, original: Settings) -> None:
    file = tmp_path / "config" / "settings.toml"
    save_settings(original, file)
    assert load_settings(file, now=NOW) == original
    assert [p.name for p in file.parent.iterdir()] == ["settings.toml"]  # no temp files


def test_a_snooze_with_an_offset_in_seconds_is_written_in_utc() -> None:
    odd = timezone(timedelta(hours=1, seconds=30))
    original = Settings(snooze_until=datetime(2025, 1, 6, 15, tzinfo=odd))
    assert parse_settings(tomllib.loads(dump_settings(original)), FILE) == original


# --- mistakes ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "key", "reason"),
    [
        # Unknown keys, anywhere.
        ("colour = 'red'", "colour", "unknown key (allowed here: caps, schedule, enabled"),
        ("[caps.idle]\ncpu = 5", "caps.idle.cpu", "allowed here: cpu_percent, memory_mib"),
        ("[caps.busy]\ncpu_percent = 5", "caps.busy", "allowed here: in_use, idle"),
        ("[owner_load]\npause = 5", "owner_load.pause", "unknown key"),
        (
            "[[schedule]]\ndays=['mon']\nstart='09:00'\nend='10:00'\nlength=1",
            "schedule[0].length",
            "unknown key",
        ),
        # Wrong types.
        ("enabled = 'yes'", "enabled", "must be true or false, got 'yes'"),
        ("idle_after = '3 min'", "idle_after", "must be a number"),
        ("max_temperature_c = true", "max_temperature_c", "must be a number, got true"),
        ("[caps.idle]\nmemory_mib = 1.5", "caps.idle.memory_mib", "must be a whole number"),
        ("caps = 5", "caps", "must be a table ([caps])"),
        ("schedule = 5", "schedule", "must be an array of tables ([[schedule]])"),
        ("snooze_until = 'tomorrow'", "snooze_until", "must be a date and time"),
        (
            "[[schedule]]\ndays='mon'\nstart='09:00'\nend='10:00'",
            "schedule[0].days",
            'must be a list of days from "mon", "tue"',
        ),
        (
            "[[schedule]]\ndays=['monday']\nstart='09:00'\nend='10:00'",
            "schedule[0].days",
            "must be a list of days",
        ),
        (
            "[[schedule]]\ndays=['mon']\nstart='9am'\nend='10:00'",
            "schedule[0].start",
            'must be a time of day like "09:00"',
        ),
        (
            "[[schedule]]\ndays=['mon']\nstart='25:00'\nend='10:00'",
            "schedule[0].start",
            "must be a time of day",
        ),
        ("[[schedule]]\ndays=['mon']\nstart='09:00'", "schedule[0].end", "is required"),
        # Out of range (checked by the domain model, reported with the file).
        ("[caps.in_use]\ncpu_percent = 120", "caps.in_use.cpu_percent", "must be within 0–100 %"),
        ("[caps.idle]\nmemory_mib = -1", "caps.idle.memory_mib", "must be ≥ 0 MiB"),
        ("[caps.idle]\nmemory_percent = 101", "caps.idle.memory_percent", "0–100"),
        ("evacuate_after = -5", "evacuate_after", "must be ≥ 0 seconds"),
        ("idle_after = 1e300", "idle_after", "must be a number of seconds"),
        ("idle_after = nan", "idle_after", "must be a number of seconds"),
        ("max_temperature_c = 300", "max_temperature_c", "0–150 °C"),
        ("snooze_until = 2025-01-06T15:00:00", "snooze_until", "include a UTC offset"),
        (
            "[owner_load]\npause_above_percent = 10\nresume_below_percent = 20",
            "owner_load.resume_below_percent",
            "must be ≤ pause_above_percent (10)",
        ),
        (
            "[[schedule]]\ndays=['mon']\nstart='09:00'\nend='09:00'",
            "schedule[0].end",
            "must differ from start",
        ),
        (
            "[[schedule]]\ndays=[]\nstart='09:00'\nend='10:00'",
            "schedule[0].days",
            "at least one day",
        ),
        (
            "[[schedule]]\ndays=['mon']\nstart='09:00'\nend='12:00'\n"
            "[[schedule]]\ndays=['mon']\nstart='11:00'\nend='13:00'",
            "schedule[1]",
            "overlaps schedule[0] (Mon 09:00–12:00)",
        ),
        (
            "[[schedule]]\ndays=['mon']\nstart='09:00'\nend='12:00'\n"
            "[schedule.caps.idle]\ncpu_percent = -1",
            "schedule[0].caps.idle.cpu_percent",
            "0–100",
        ),
    ],
)
def test_mistakes_name_the_file_the_key_and_the_reason(text: str, key: str, reason: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse(text)
    error = caught.value
    assert (error.file, error.key) == (FILE, key)
    assert reason in error.reason
    assert str(error) == f"{FILE}: {key}: {error.reason}"


@pytest.mark.parametrize(
    ("text", "key", "reason"),
    [
        ("max_cpu_percent = 150", "max_cpu_percent", "0–100"),
        ("max_memory_mib = -1", "max_memory_mib", "≥ 0"),
        ("max_memory_percent = 'half'", "max_memory_percent", "must be a number"),
        ("owner_may_disable = 0", "owner_may_disable", "true or false"),
        ("reason = ''", "reason", "must not be empty"),
        ("[[blackout]]\ndays=['sun']\nstart='01:00'\nend='01:00'", "blackout[0].end", "differ"),
        (
            "[[blackout]]\ndays=['sun']\nstart='01:00'\nend='02:00'\ncaps=1",
            "blackout[0].caps",
            "unknown",
        ),
        ("max_cpu = 5", "max_cpu", "allowed here: max_cpu_percent"),
    ],
)
def test_fleet_mistakes_name_the_file_the_key_and_the_reason(
    text: str, key: str, reason: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_fleet(tomllib.loads(text), FILE)
    assert (caught.value.key, caught.value.file) == (key, FILE)
    assert reason in caught.value.reason


def test_broken_toml_names_the_file_and_the_line(tmp_path: Path) -> None:
    file = tmp_path / "settings.toml"
    file.write_text("enabled = true\nidle_after = \n")
    with pytest.raises(ConfigError) as caught:
        load_settings(file)
    assert caught.value.file == file
    assert caught.value.key == ""
    assert "is not valid TOML" in str(caught.value)
    assert "line 2" in str(caught.value)


def test_a_file_that_is_not_text(tmp_path: Path) -> None:
    file = tmp_path / "settings.toml"
    file.write_bytes(b"enabled = \xff\xfe")
    with pytest.raises(ConfigError, match="is not UTF-8 text"):
        load_settings(file)


def test_an_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read it"):
        load_settings(tmp_path)  # a directory


def test_field_errors_and_config_errors_stay_distinct() -> None:
    assert not issubclass(ConfigError, FieldError)


# --- writing ---------------------------------------------------------------------------


def test_saving_replaces_the_file_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    file = tmp_path / "settings.toml"
    file.write_text("enabled = false\n")
    save_settings(Settings(idle_after=timedelta(seconds=60)), file)
    assert load_settings(file).idle_after == timedelta(seconds=60)
    assert os.listdir(tmp_path) == ["settings.toml"]


def test_a_failed_save_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    file = tmp_path / "settings.toml"
    file.write_text("enabled = false\n")

    def fail(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="No space"):
        save_settings(Settings(), file)
    assert file.read_text() == "enabled = false\n"
    assert os.listdir(tmp_path) == ["settings.toml"]


def test_the_written_file_is_readable_by_people() -> None:
    text = dump_settings(
        Settings(
            schedule=(
                DonationWindow(
                    Window(frozenset({Weekday.FRI, Weekday.MON}), time(9), time(17), 'a "b"')
                ),
            )
        )
    )
    assert 'label = "a \\"b\\""' in text
    assert 'days = ["mon", "fri"]' in text
    assert 'start = "09:00"' in text
    assert "idle_after = 180\n" in text
