"""The systemd units as systemd itself reads them (`systemd-analyze verify`): every key
known, every value valid. systemd does not run here, so the sandbox is not exercised; a
typo in a hardening option would be silently ignored by systemd, which this catches."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.installer.debroot import parse_unit

UNITS = Path(__file__).resolve().parents[2] / "installer" / "linux"


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="needs systemd-analyze")
@pytest.mark.parametrize("name", ["donor-agent", "donor-coordinator"])
def test_systemd_accepts_every_line_of_the_unit(name: str) -> None:
    done = subprocess.run(
        ["systemd-analyze", "verify", str(UNITS / f"{name}.service")],
        capture_output=True,
        text=True,
        check=False,
    )
    complaints = [
        line
        for line in (done.stdout + done.stderr).splitlines()
        # The program is installed by the package, not on the machine running the tests.
        if f"Command /opt/donor-app/bin/{name} is not executable" not in line
    ]
    assert complaints == []


def test_the_coordinator_runs_unprivileged_with_room_for_its_connections() -> None:
    unit = parse_unit((UNITS / "donor-coordinator.service").read_text())
    assert unit.exec_start[:3] == [
        "/opt/donor-app/bin/donor-coordinator",
        "--data-dir",
        "/var/lib/donor-coordinator",
    ]
    assert unit.directories == {"/var/lib/donor-coordinator": 0o700}
    settings = unit.settings
    assert settings["LimitNOFILE"] == "65536"
    assert settings["DynamicUser"] == "yes"
    assert settings["CapabilityBoundingSet"] == ""
    assert settings["NoNewPrivileges"] == "yes"
    assert settings["ProtectSystem"] == "strict"
    assert settings["ProtectHome"] == "yes"
    assert settings["PrivateTmp"] == settings["PrivateDevices"] == "yes"
    assert set(settings["RestrictAddressFamilies"].split()) == {"AF_UNIX", "AF_INET", "AF_INET6"}
