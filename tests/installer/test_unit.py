"""The systemd unit as systemd itself reads it (`systemd-analyze verify`): every key known,
every value valid. systemd does not run here, so the sandbox is not exercised; a typo in
a hardening option would be silently ignored by systemd, which this catches."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parents[2] / "installer" / "linux" / "donor-agent.service"


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="needs systemd-analyze")
def test_systemd_accepts_every_line_of_the_unit() -> None:
    done = subprocess.run(
        ["systemd-analyze", "verify", str(UNIT)], capture_output=True, text=True, check=False
    )
    complaints = [
        line
        for line in (done.stdout + done.stderr).splitlines()
        # The program is installed by the package, not on the machine running the tests.
        if "Command /opt/donor-app/bin/donor-agent is not executable" not in line
    ]
    assert complaints == []
