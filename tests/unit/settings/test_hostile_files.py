"""Hostile settings and fleet files: every one is a `ConfigError` naming the file, the key
and what is allowed, never another exception (which would stop the agent's engine tick,
kill a starting agent or give the installer a traceback)."""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from donor_app.domain.settings import (
    MAX_DURATION,
    MAX_MIB,
    MAX_SNOOZE,
    MAX_WINDOWS,
    SNOOZE_FOREVER,
    SNOOZE_UNTIL_RESUMED,
)
from donor_app.settings.config import (
    ConfigError,
    load_fleet,
    load_link_config,
    load_settings,
    parse_link_config,
    parse_settings,
)
from donor_app.settings.toml_reader import MAX_FILE_BYTES

PEM = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
HUGE = "9" * 400  # an integer no float can hold
NOW = datetime(2026, 3, 2, 12, tzinfo=UTC)


def _file(tmp_path: Path, text: str, name: str = "settings.toml") -> Path:
    file = tmp_path / name
    file.write_text(text, encoding="utf-8")
    return file


def _refused(load: Callable[[Path], object], file: Path, key: str, words: str) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        load(file)
    assert (caught.value.file, caught.value.key) == (file, key)
    assert words in caught.value.reason
    return caught.value


# --- the TOML read itself ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("a = " + "[" * 5000 + "]" * 5000, "nested too deeply"),
        ("a = " + "{b = " * 3000 + "1" + "}" * 3000, "nested too deeply"),
        ("a = " + "9" * 5000, "is not valid TOML"),  # more digits than Python converts
    ],
)
def test_documents_the_reader_cannot_take_name_the_file(
    tmp_path: Path, text: str, words: str
) -> None:
    file = _file(tmp_path, text)
    _refused(load_settings, file, "", words)
    _refused(load_fleet, file, "", words)
    _refused(load_link_config, file, "", words)


def test_a_file_too_large_to_be_a_config_is_refused(tmp_path: Path) -> None:
    file = _file(tmp_path, "# padding\n" * (MAX_FILE_BYTES // 10 + 1))
    _refused(load_settings, file, "", f"larger than {MAX_FILE_BYTES // 1024} KiB")


def test_a_path_the_system_cannot_name_is_refused(tmp_path: Path) -> None:
    for file in (tmp_path / "a\0b.toml", tmp_path / ("x" * 5000)):
        with pytest.raises(ConfigError, match="cannot read it") as caught:
            load_settings(file)
        assert caught.value.file == file


# --- numbers -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "key", "words"),
    [
        (f"[caps.idle]\ncpu_percent = {HUGE}", "caps.idle.cpu_percent", "0–100 %"),
        (f"[caps.idle]\nmemory_percent = -{HUGE}", "caps.idle.memory_percent", "0–100 %"),
        (f"max_temperature_c = {HUGE}", "max_temperature_c", "0–150 °C"),
        (f"[owner_load]\npause_above_percent = {HUGE}", "owner_load.pause_above_percent", "0–100"),
        (f"idle_after = {HUGE}", "idle_after", "seconds"),
        (f"[owner_load]\nresume_after = {HUGE}", "owner_load.resume_after", "seconds"),
        # Far inside timedelta's range, but a deadline that far ahead is past year 9999.
        ("idle_after = 1e12", "idle_after", f"at most {MAX_DURATION.days} days"),
        ("checkpoint_after = 1e9", "checkpoint_after", f"at most {MAX_DURATION.days} days"),
        (f"[caps.in_use]\nmemory_mib = {HUGE}", "caps.in_use.memory_mib", f"≤ {MAX_MIB} MiB"),
        (f"[caps.in_use]\nmemory_mib = {MAX_MIB + 1}", "caps.in_use.memory_mib", "MiB"),
    ],
)
def test_numbers_out_of_any_range_name_the_key_and_the_range(
    tmp_path: Path, text: str, key: str, words: str
) -> None:
    _refused(load_settings, _file(tmp_path, text), key, words)


@pytest.mark.parametrize(
    ("text", "key", "words"),
    [
        (f"max_cpu_percent = {HUGE}", "max_cpu_percent", "0–100 %"),
        (f"max_memory_percent = {HUGE}", "max_memory_percent", "0–100 %"),
        (f"max_memory_mib = {HUGE}", "max_memory_mib", f"≤ {MAX_MIB} MiB"),
    ],
)
def test_fleet_numbers_out_of_any_range_name_the_key(
    tmp_path: Path, text: str, key: str, words: str
) -> None:
    _refused(load_fleet, _file(tmp_path, text, "fleet.toml"), key, words)


def test_a_value_too_big_to_show_is_still_named() -> None:
    # Values given as data (not from a file) may be bigger than repr() will write.
    data = {"enabled": 10**5000}
    with pytest.raises(ConfigError) as caught:
        parse_settings(data, Path("settings.toml"), now=NOW)
    assert caught.value.key == "enabled"
    assert "must be true or false" in caught.value.reason


def _windows(table: str, count: int) -> str:
    """`count` windows of one second each on Mondays, none overlapping."""

    def at(second: int) -> str:
        return f'"{second // 3600:02}:{second // 60 % 60:02}:{second % 60:02}"'

    return "".join(
        f'[[{table}]]\ndays = ["mon"]\nstart = {at(2 * n)}\nend = {at(2 * n + 1)}\n'
        for n in range(count)
    )


def test_more_windows_than_the_week_has_hours_are_refused(tmp_path: Path) -> None:
    # Checking windows for overlaps takes time with the square of their number: 5000
    # held the agent's engine thread for seconds at every reload.
    _refused(load_settings, _file(tmp_path, _windows("schedule", 5000)), "schedule", "at most 168")
    fleet = _file(tmp_path, _windows("blackout", MAX_WINDOWS + 1), "fleet.toml")
    _refused(load_fleet, fleet, "blackout", f"at most {MAX_WINDOWS}")
    assert len(load_settings(_file(tmp_path, _windows("schedule", MAX_WINDOWS))).schedule) == 168


# --- the snooze ------------------------------------------------------------------------


def test_a_snooze_in_year_9999_is_refused(tmp_path: Path) -> None:
    file = _file(tmp_path, "snooze_until = 9999-12-31T23:59:59-01:00\n")
    _refused(load_settings, file, "snooze_until", f"at most {MAX_SNOOZE.days} days ahead")


@pytest.mark.parametrize(
    "until",
    [
        NOW - timedelta(days=3650),  # long over: no longer in force
        datetime(1, 1, 1, tzinfo=UTC),
        NOW + MAX_SNOOZE,
        NOW + MAX_SNOOZE + timedelta(hours=1),  # written, then the clock was set back
        NOW + SNOOZE_FOREVER,  # "until I resume", as the agent writes it
        NOW - timedelta(days=3650) + SNOOZE_FOREVER,  # the same, ten years on
    ],
)
def test_snoozes_the_agent_writes_are_read_back(until: datetime) -> None:
    assert parse_settings({"snooze_until": until}, Path("s"), now=NOW).snooze_until == until


AHEAD = f"must be at most {MAX_SNOOZE.days} days ahead"


@pytest.mark.parametrize(
    ("until", "words"),
    [
        (NOW + MAX_SNOOZE + timedelta(days=2), AHEAD),
        (NOW + timedelta(days=365 * 20), AHEAD),
        (NOW + SNOOZE_FOREVER + timedelta(days=3650), AHEAD),
        # Years 1 and 9999 with an offset that takes them out of datetime's range in UTC.
        (datetime(9999, 12, 31, 23, tzinfo=timezone(timedelta(hours=-5))), AHEAD),
        (datetime(1, 1, 1, tzinfo=timezone(timedelta(hours=5))), "years 1–9999 in UTC"),
    ],
)
def test_snoozes_no_snooze_call_could_make_are_refused(until: datetime, words: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_settings({"snooze_until": until}, Path("s"), now=NOW)
    assert caught.value.key == "snooze_until"
    assert words in caught.value.reason


def test_the_file_and_the_agent_share_the_snooze_bounds() -> None:
    """What the Snooze call takes and the agent writes, the settings file reads back."""
    from donor_app.agent import engine, local_api
    from donor_app.domain import policy

    assert local_api.MAX_SNOOZE == MAX_SNOOZE
    assert engine.SNOOZE_FOREVER == SNOOZE_FOREVER
    assert policy.SNOOZE_UNTIL_RESUMED == SNOOZE_UNTIL_RESUMED


# --- the files the fleet file names -----------------------------------------------------------


def _coordinator(tmp_path: Path, **keys: str) -> Path:
    keys = {"address": '"coord.example.org:7443"'} | keys
    lines = [f"{key} = {value}" for key, value in keys.items()]
    return _file(tmp_path, "[coordinator]\n" + "\n".join(lines) + "\n", "fleet.toml")


def _pem_file(tmp_path: Path) -> str:
    (tmp_path / "ca.pem").write_text(PEM)
    return f'"{tmp_path / "ca.pem"}"'


@pytest.mark.parametrize(
    ("key", "path", "words"),
    [
        ("ca_file", '"/tmp/ca\\u0000.pem"', "NUL"),
        ("token_file", '"/tmp/token\\u0000"', "NUL"),
        ("token_file", f'"/tmp/{"t" * 300}"', "cannot read"),  # one name too long
        ("token_file", f'"/{"t/" * 3000}t"', "cannot read"),  # the whole path too long
        ("ca_file", f'"/{"t/" * 3000}t"', "cannot read"),
        # Read to the end, these would never end.
        ("ca_file", '"/dev/zero"', "not a regular file"),
        ("token_file", '"/dev/zero"', "not a regular file"),
        ("token_file", '"/tmp"', "not a regular file"),
    ],
)
def test_files_the_fleet_file_names_are_checked(
    tmp_path: Path, key: str, path: str, words: str
) -> None:
    keys = {"ca_pem": f'"""{PEM}"""'} if key != "ca_file" else {}
    keys[key] = path
    file = _coordinator(tmp_path, **keys)
    _refused(load_link_config, file, f"coordinator.{key}", words)


def test_named_files_larger_than_a_config_are_refused(tmp_path: Path) -> None:
    (tmp_path / "big").write_bytes(PEM.encode() * (MAX_FILE_BYTES // len(PEM) + 1))
    file = _coordinator(tmp_path, ca_file=f'"{tmp_path}/big"')
    _refused(load_link_config, file, "coordinator.ca_file", "larger than")
    file = _coordinator(tmp_path, ca_file=_pem_file(tmp_path), token_file=f'"{tmp_path}/big"')
    _refused(load_link_config, file, "coordinator.token_file", "larger than")


def test_a_fifo_is_refused_without_waiting_for_a_writer(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo")
    file = _coordinator(tmp_path, ca_file=_pem_file(tmp_path), token_file=f'"{tmp_path}/fifo"')
    _refused(load_link_config, file, "coordinator.token_file", "not a regular file")


def test_a_binary_token_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "token").write_bytes(b"\xff\xfe\x00binary")
    file = _coordinator(tmp_path, ca_file=_pem_file(tmp_path), token_file=f'"{tmp_path}/token"')
    _refused(load_link_config, file, "coordinator.token_file", "is not UTF-8 text")


def test_a_missing_token_file_means_no_token(tmp_path: Path) -> None:
    file = _coordinator(tmp_path, ca_file=_pem_file(tmp_path), token_file=f'"{tmp_path}/gone"')
    link = load_link_config(file)
    assert link is not None
    assert (link.token, link.token_file) == (None, tmp_path / "gone")


def test_a_port_in_other_digits_is_refused(tmp_path: Path) -> None:
    file = _coordinator(tmp_path, address='"coord:\u0667\u0664\u0664\u0663"')
    _refused(load_link_config, file, "coordinator.address", "host:port")


def test_a_ca_that_cannot_be_bytes_is_refused() -> None:
    # Only data given directly can hold a lone surrogate (a file cannot).
    data = {"coordinator": {"address": "h:1", "ca_pem": "BEGIN CERTIFICATE \udc80"}}
    with pytest.raises(ConfigError) as caught:
        parse_link_config(data, Path("fleet.toml"))
    assert caught.value.key == "coordinator.ca_pem"


@pytest.mark.parametrize(
    "address", ["a..b:7443", ".:7443", f"{'x' * 64}.org:7443", f"{'x.' * 130}org:7443", "h:0"]
)
def test_a_host_no_resolver_takes_is_refused(tmp_path: Path, address: str) -> None:
    file = _coordinator(tmp_path, address=f'"{address}"', ca_pem=f'"""{PEM}"""')
    _refused(load_link_config, file, "coordinator.address", "host:port")


@pytest.mark.parametrize("address", ["coord.example.org.:7443", "[fe80::1]:7443", "10.0.0.1:1"])
def test_hosts_a_resolver_takes_are_accepted(tmp_path: Path, address: str) -> None:
    link = load_link_config(_coordinator(tmp_path, address=f'"{address}"', ca_pem=f'"""{PEM}"""'))
    assert link is not None
    assert link.address == address
