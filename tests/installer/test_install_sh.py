"""install.sh (Linux without dpkg), from the tarball, in a clean root, against a real
coordinator: silent install, enrollment, reinstall over a running agent, uninstall,
purge, and a rejected fleet config. The root is Debian, but dpkg plays no part."""

from __future__ import annotations

import stat
import subprocess
from pathlib import Path

import pytest

from tests.coordinator_helpers import RunningCoordinator
from tests.installer import packages
from tests.installer.conftest import (
    VERSION,
    Media,
    connected_donors,
    fleet_for,
    needs_root_tools,
    new_token,
)
from tests.installer.debroot import DebRoot, changed, parse_unit, start_as_unit
from tests.waiting import wait_for

pytestmark = [pytest.mark.slow, needs_root_tools()]

UNIT = "/etc/systemd/system/donor-agent.service"
SCRIPT = f"/srv/media/donor-app-{VERSION}/install.sh"
STATE = ("etc/donor_app/", "var/lib/donor_app/", "var/cache/donor_app/")


@pytest.fixture(scope="module")
def tarball() -> Path:
    return packages.tarball(VERSION)


def unpack(root: DebRoot, tarball: Path) -> None:
    target = root.host("/srv/media")
    target.mkdir(parents=True, exist_ok=True)
    subprocess.run(["tar", "-xzf", str(tarball), "-C", str(target)], check=True)


def test_install_sh_install_reinstall_uninstall_purge(
    root: DebRoot, media: Media, coordinator: RunningCoordinator, tarball: Path, tmp_path: Path
) -> None:
    unpack(root, tarball)
    fleet = fleet_for(coordinator, media, new_token(coordinator))
    before = root.files()

    result = root.run(["sh", SCRIPT, "--silent", "--config", fleet])
    assert result.returncode == 0, result.output
    assert "will enroll with the coordinator" in result.output
    for name in ("donor-agent", "donor-app", "donor-coordinator"):
        assert root.host(f"/usr/local/bin/{name}").is_symlink()
    site = root.host("/etc/donor_app")
    assert stat.S_IMODE((site / "fleet.toml").stat().st_mode) == 0o644
    assert stat.S_IMODE((site / "enroll-token").stat().st_mode) == 0o600
    assert parse_unit(root.host(UNIT).read_text()).exec_start[0] == "/opt/donor-app/bin/donor-agent"
    assert root.host("/etc/systemd/system/multi-user.target.wants/donor-agent.service").is_symlink()
    assert root.host("/etc/xdg/autostart/donor-app.desktop").is_file()

    log = tmp_path / "agent.log"
    agent = start_as_unit(root, UNIT, log, {"--libvirt-uri": "test:///default"})
    donors = wait_for(lambda: connected_donors(coordinator), 180, "the agent to enroll")
    wait_for(lambda: not (site / "enroll-token").exists(), 60, "the used token to be removed")
    credentials = root.host("/var/lib/donor_app/credentials.json").read_bytes()

    # Again over the running agent (an upgrade): it is stopped, the enrollment stays.
    result = root.run(["sh", SCRIPT, "--silent"])
    assert result.returncode == 0, result.output
    assert agent.wait(120) == 0, log.read_text()
    assert root.host("/var/lib/donor_app/credentials.json").read_bytes() == credentials
    agent = start_as_unit(root, UNIT, log, {"--libvirt-uri": "test:///default"})
    wait_for(lambda: connected_donors(coordinator) == donors, 180, "the same donor back")

    # Uninstall with the installed copy of the script: agent stopped, state kept.
    result = root.run(["/opt/donor-app/libexec/install.sh", "--uninstall"])
    assert result.returncode == 0, result.output
    assert agent.wait(120) == 0
    left = changed(before, root.files())
    assert left and all(path.startswith(STATE) for path in left), sorted(left)

    result = root.run(["sh", SCRIPT, "--uninstall", "--purge"])
    assert result.returncode == 0, result.output
    assert changed(before, root.files()) == set()


@pytest.mark.parametrize(
    ("content", "code"), [(None, 3), ("[coordinator]\naddress = 'nohost'\n", 4)]
)
def test_install_sh_rejects_a_bad_fleet_config_before_changing_anything(
    root: DebRoot, media: Media, tarball: Path, content: str | None, code: int
) -> None:
    unpack(root, tarball)
    fleet = media.put("fleet.toml", content) if content else "/srv/media/absent.toml"
    before = root.files()
    result = root.run(["sh", SCRIPT, "--silent", "--config", fleet])
    assert result.returncode == code, result.output
    assert "fleet config rejected" in result.output
    assert changed(before, root.files()) == set()


def test_install_sh_usage_errors_change_nothing(root: DebRoot, tarball: Path) -> None:
    unpack(root, tarball)
    before = root.files()
    for argv in (["--purge"], ["--silent", "--purge"], ["--bogus"], []):
        result = root.run(["sh", SCRIPT, *argv])
        assert result.returncode == 2, (argv, result.output)
    assert changed(before, root.files()) == set()
