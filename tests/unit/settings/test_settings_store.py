"""SettingsStore: last good values stay in force, errors are reported once."""

from __future__ import annotations

import logging
from datetime import timedelta
from pathlib import Path

import pytest

from donor_app.domain.fleet import FleetPolicy
from donor_app.domain.settings import Settings
from donor_app.settings.config import SettingsStore
from donor_app.settings.paths import paths_under


@pytest.fixture
def store(tmp_path: Path) -> SettingsStore:
    paths = paths_under(tmp_path)
    return SettingsStore(paths.settings_file, paths.fleet_file)


@pytest.fixture
def settings_file(tmp_path: Path) -> Path:
    file = paths_under(tmp_path).settings_file
    file.parent.mkdir(parents=True)
    return file


@pytest.fixture
def fleet_file(tmp_path: Path) -> Path:
    file = paths_under(tmp_path).fleet_file
    file.parent.mkdir(parents=True)
    return file


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_without_files_the_defaults_are_in_force(store: SettingsStore) -> None:
    assert not store.reload()
    assert store.settings == Settings()
    assert store.fleet == FleetPolicy()
    assert store.errors == ()


def test_reload_reports_changes(store: SettingsStore, settings_file: Path) -> None:
    settings_file.write_text("idle_after = 60\n")
    assert store.reload()
    assert store.settings.idle_after == timedelta(seconds=60)
    assert not store.reload()


def test_a_corrupt_file_keeps_the_last_good_settings_and_reports_once(
    store: SettingsStore, settings_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings_file.write_text("idle_after = 60\n")
    store.reload()
    settings_file.write_text("idle_after = -60\n")
    with caplog.at_level(logging.INFO):
        assert not store.reload()
        assert not store.reload()
        assert not store.reload()
    assert store.settings.idle_after == timedelta(seconds=60)
    (error,) = store.errors
    assert (error.file, error.key) == (settings_file, "idle_after")
    (message,) = warnings(caplog)
    assert "idle_after: must be ≥ 0 seconds" in message
    assert "keeping the last good values" in message

    # A different mistake is reported again.
    settings_file.write_text("idle_after = 'soon'\n")
    store.reload()
    assert len(warnings(caplog)) == 2

    # Fixed: the new values are in force and the error is gone.
    settings_file.write_text("idle_after = 90\n")
    with caplog.at_level(logging.INFO):
        assert store.reload()
    assert store.settings.idle_after == timedelta(seconds=90)
    assert store.errors == ()
    assert "is valid again" in caplog.records[-1].getMessage()


def test_settings_invalid_from_the_start_give_the_defaults(
    store: SettingsStore, settings_file: Path
) -> None:
    settings_file.write_text("[caps.idle]\ncpu_percent = 900\n")
    store.reload()
    assert store.settings == Settings()
    assert store.errors[0].key == "caps.idle.cpu_percent"


def test_a_fleet_file_invalid_from_the_start_allows_no_donating(
    store: SettingsStore, fleet_file: Path
) -> None:
    fleet_file.write_text("max_cpu_percent = 'fifty'\n")
    assert store.reload()
    assert store.fleet.max_cpu_percent == 0
    assert store.fleet.max_memory_mib == 0
    assert str(fleet_file) in store.fleet.reason
    fleet_file.write_text("max_cpu_percent = 50\n")
    assert store.reload()
    assert store.fleet == FleetPolicy(max_cpu_percent=50)


def test_a_fleet_file_that_breaks_keeps_the_last_good_policy(
    store: SettingsStore, fleet_file: Path
) -> None:
    fleet_file.write_text("max_cpu_percent = 50\n")
    store.reload()
    fleet_file.write_text("max_cpu_percent = [\n")
    assert not store.reload()
    assert store.fleet == FleetPolicy(max_cpu_percent=50)
    assert store.errors[0].file == fleet_file


def test_save_writes_and_puts_in_force(store: SettingsStore, settings_file: Path) -> None:
    settings_file.write_text("bogus = 1\n")
    store.reload()
    wanted = Settings(enabled=False, idle_after=timedelta(seconds=30))
    store.save(wanted)
    assert store.settings == wanted
    assert store.errors == ()
    assert not store.reload()
    assert store.settings == wanted


def test_save_creates_the_config_directory(tmp_path: Path) -> None:
    paths = paths_under(tmp_path)
    store = SettingsStore(paths.settings_file, paths.fleet_file)
    store.save(Settings(enabled=False))
    assert paths.settings_file.exists()


@pytest.mark.parametrize(
    "hostile",
    [
        b"idle_after = " + b"[" * 5000 + b"]" * 5000,  # nested deeper than the reader goes
        b"idle_after = " + b"9" * 5000,  # more digits than Python converts
        b"idle_after = " + b"9" * 400,  # more than any float
        b"max_temperature_c = -" + b"9" * 400,
        b"snooze_until = 9999-12-31T23:59:59-05:00",  # past year 9999 in UTC
        b"\xff\xfe\x00\x01",
    ],
)
def test_a_hostile_file_keeps_the_last_good_settings(
    store: SettingsStore, settings_file: Path, hostile: bytes
) -> None:
    settings_file.write_text("idle_after = 60\n")
    store.reload()
    settings_file.write_bytes(hostile)
    assert not store.reload()
    assert store.settings.idle_after == timedelta(seconds=60)
    (error,) = store.errors
    assert error.file == settings_file


def test_a_reader_that_fails_otherwise_counts_as_an_invalid_file(
    store: SettingsStore,
    settings_file: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings_file.write_text("idle_after = 60\n")
    store.reload()

    def broken(file: Path) -> Settings:
        raise RuntimeError("a reader bug")

    monkeypatch.setattr(store._settings, "_load", broken)
    with caplog.at_level(logging.WARNING):
        assert not store.reload()
        assert not store.reload()
    assert store.settings.idle_after == timedelta(seconds=60)
    (error,) = store.errors
    assert (error.file, error.key) == (settings_file, "")
    assert "RuntimeError: a reader bug" in error.reason
    (record,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert record.exc_info is not None  # where the bug is, logged once
