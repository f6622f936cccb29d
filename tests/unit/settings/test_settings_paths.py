"""Where files live: computed, never created, overridable."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from donor_app.settings.paths import Paths, default_paths, paths_under, system_paths


def test_paths_under_a_root(tmp_path: Path) -> None:
    paths = paths_under(tmp_path)
    assert paths.settings_file == tmp_path / "config" / "settings.toml"
    assert paths.fleet_file == tmp_path / "site-config" / "fleet.toml"
    assert paths.socket_file == tmp_path / "run" / "agent.sock"
    assert {paths.data_dir, paths.cache_dir} == {tmp_path / "data", tmp_path / "cache"}
    assert list(tmp_path.iterdir()) == []  # nothing created


def test_default_paths_are_per_application_and_create_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    for variable in ("XDG_CONFIG_HOME", "XDG_DATA_HOME", "XDG_CACHE_HOME", "XDG_RUNTIME_DIR"):
        monkeypatch.setenv(variable, str(tmp_path / variable.lower()))
    paths = default_paths()
    for directory in (paths.config_dir, paths.data_dir, paths.cache_dir, paths.runtime_dir):
        assert directory.name == "donor_app"
    assert paths.settings_file.name == "settings.toml"
    assert paths.fleet_file.name == "fleet.toml"
    assert list(tmp_path.iterdir()) == []
    if sys.platform.startswith("linux"):
        assert paths.config_dir == tmp_path / "xdg_config_home" / "donor_app"
        assert paths.runtime_dir == tmp_path / "xdg_runtime_dir" / "donor_app"


def test_a_paths_value_can_be_built_directly(tmp_path: Path) -> None:
    paths = Paths(tmp_path / "a", tmp_path / "b", tmp_path / "c", tmp_path / "d", tmp_path / "e")
    assert paths.settings_file == tmp_path / "a" / "settings.toml"


def test_system_paths_serve_the_machine_not_roots_home() -> None:
    paths = system_paths()
    assert paths.settings_file == Path("/etc/donor_app/settings.toml")
    assert paths.fleet_file == Path("/etc/xdg/donor_app/fleet.toml")
    assert paths.data_dir == Path("/var/lib/donor_app")
    assert paths.socket_file == Path("/run/donor_app/agent.sock")
