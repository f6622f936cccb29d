"""The macOS LaunchDaemon/LaunchAgent and pkg recipe, checked for content (pkgbuild and
launchd exist only on macOS)."""

from __future__ import annotations

import plistlib
import subprocess
from pathlib import Path

import pytest

from donor_app.settings.autostart import LAUNCH_AGENT_LABEL, launch_agent_plist

MACOS = Path(__file__).resolve().parents[2] / "installer" / "macos"


def load(name: str) -> dict[str, object]:
    with (MACOS / name).open("rb") as file:
        return plistlib.load(file)


def test_the_agent_daemon_starts_at_boot_and_restarts_only_on_failure() -> None:
    daemon = load("org.donor_app.agent.plist")
    assert daemon["Label"] == "org.donor_app.agent"
    args = daemon["ProgramArguments"]
    assert isinstance(args, list)
    assert args[0] == "/Library/donor_app/bin/donor-agent"
    options = dict(zip(args[1::2], args[2::2], strict=True))
    assert options["--fleet-config"] == "/Library/Application Support/donor_app/fleet.toml"
    assert options["--data-dir"].startswith("/Library/Application Support/donor_app")
    assert daemon["RunAtLoad"] is True
    # A stop (SIGTERM: guests paused, exit 0) must not bring it back; a crash must.
    assert daemon["KeepAlive"] == {"SuccessfulExit": False}
    assert daemon["ExitTimeOut"] >= 60, "time to pause the guests"
    assert "UserName" not in daemon, "a LaunchDaemon runs as root"


def test_the_tray_agent_is_what_the_app_itself_writes() -> None:
    tray = load("org.donor_app.tray.plist")
    assert tray["Label"] == LAUNCH_AGENT_LABEL
    assert tray == plistlib.loads(launch_agent_plist(["/Library/donor_app/bin/donor-app"]))
    assert tray["RunAtLoad"] is True and tray["KeepAlive"] is False


@pytest.mark.parametrize(
    "script", ["scripts/preinstall", "scripts/postinstall", "uninstall.sh", "build-pkg"]
)
def test_scripts_parse_and_are_executable(script: str) -> None:
    path = MACOS / script
    assert path.stat().st_mode & 0o111
    done = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr


def test_preinstall_checks_the_fleet_config_before_stopping_anything() -> None:
    text = (MACOS / "scripts/preinstall").read_text()
    assert text.index('fleet-check.pyz" check') < text.index("launchctl bootout")
