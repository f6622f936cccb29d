"""The Windows MSI, built here with wixl and read back with msiinfo: per-machine, the
properties of a silent install, the agent service, the tray's Run key, the fleet-config
custom action in the right place of the sequence. Its executables are placeholders (see
installer/build-msi); the checker it carries is real and is run here."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(
    not (shutil.which("wixl") and shutil.which("msiinfo") and shutil.which("msiextract")),
    reason="needs wixl and msitools (scripts/bootstrap installs them)",
)

# msidbServiceControlEvent*, msidbCustomActionType*, msidbComponentAttributes64bit.
START_ON_INSTALL, STOP_ON_INSTALL, STOP_ON_UNINSTALL, DELETE_ON_UNINSTALL = 1, 2, 32, 128
EXE_FROM_FILE, IN_SCRIPT, NO_IMPERSONATE = 18, 1024, 2048
SERVICE_AUTO_START, SERVICE_OWN_PROCESS = 2, 16
HKLM = 2


@pytest.fixture(scope="module")
def msi(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("msi")
    done = subprocess.run(
        [str(REPO / "installer/build-msi"), "--version", "1.2.3", "--out", str(out)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return Path(done.stdout.strip().splitlines()[-1])


def table(msi: Path, name: str) -> list[dict[str, str]]:
    """The rows of table `name` (msiinfo export: names, types, key line, then rows)."""
    text = subprocess.run(
        ["msiinfo", "export", str(msi), name], capture_output=True, text=True, check=True
    ).stdout
    lines = text.rstrip("\r\n").split("\r\n") if "\r\n" in text else text.splitlines()
    columns = lines[0].split("\t")
    return [dict(zip(columns, line.split("\t"), strict=False)) for line in lines[3:]]


def row(rows: list[dict[str, str]], **match: str) -> dict[str, str]:
    found = [r for r in rows if all(r.get(k) == v for k, v in match.items())]
    assert len(found) == 1, (match, rows)
    return found[0]


def test_per_machine_x64_with_the_silent_install_properties(msi: Path) -> None:
    summary = subprocess.run(
        ["msiinfo", "suminfo", str(msi)], capture_output=True, text=True, check=True
    ).stdout
    assert "Template: x64;1033" in summary
    properties = {r["Property"]: r["Value"] for r in table(msi, "Property")}
    assert properties["ALLUSERS"] == "1"
    assert properties["ProductVersion"] == "1.2.3"
    assert {"COORDINATOR", "TOKEN", "POLICY"} <= properties.keys()
    assert properties["MsiHiddenProperties"] == "TOKEN", "the token must stay out of logs"
    assert "WIX_UPGRADE_DETECTED" in properties["SecureCustomProperties"]
    assert any(r["ActionProperty"] == "WIX_UPGRADE_DETECTED" for r in table(msi, "Upgrade"))


def test_the_agent_is_an_automatic_localsystem_service(msi: Path) -> None:
    service = row(table(msi, "ServiceInstall"), Name="donor-agent")
    assert int(service["ServiceType"]) == SERVICE_OWN_PROCESS
    assert int(service["StartType"]) == SERVICE_AUTO_START
    assert service["StartName"] == "LocalSystem"
    assert "--fleet-config" in service["Arguments"]
    assert "[CommonAppDataFolder]donor_app\\fleet.toml" in service["Arguments"]
    component = row(table(msi, "Component"), Component=service["Component_"])
    assert int(component["Attributes"]) & 256, "a 64-bit component"
    exe = row(table(msi, "File"), File=component["KeyPath"])
    assert exe["FileName"] == "donor-agent.exe"
    control = row(table(msi, "ServiceControl"), Name="donor-agent")
    event = int(control["Event"])
    for bit in (START_ON_INSTALL, STOP_ON_INSTALL, STOP_ON_UNINSTALL, DELETE_ON_UNINSTALL):
        assert event & bit, (event, bit)


def test_the_tray_starts_from_the_machine_run_key(msi: Path) -> None:
    run = row(table(msi, "Registry"), Key="Software\\Microsoft\\Windows\\CurrentVersion\\Run")
    assert int(run["Root"]) == HKLM
    assert run["Name"] == "donor_app"
    assert run["Value"] == '"[INSTALLDIR]donor-app.exe"'
    directories = {r["Directory"]: r for r in table(msi, "Directory")}
    assert directories["INSTALLDIR"]["Directory_Parent"] == "ProgramFiles64Folder"


def test_the_fleet_config_action_runs_as_system_before_the_service_starts(msi: Path) -> None:
    action = row(table(msi, "CustomAction"), Action="FleetConfig")
    kind = int(action["Type"])
    assert kind & 0x3F == EXE_FROM_FILE and kind & IN_SCRIPT and kind & NO_IMPERSONATE
    assert action["Source"] == "AgentExe"
    for prop in ("[COORDINATOR]", "[TOKEN]", "[POLICY]"):
        assert prop in action["Target"]
    sequence = {r["Action"]: r for r in table(msi, "InstallExecuteSequence")}
    assert sequence["FleetConfig"]["Condition"] == "NOT REMOVE"
    order = {name: int(r["Sequence"]) for name, r in sequence.items()}
    assert order["InstallFiles"] < order["FleetConfig"] < order["StartServices"]
    assert order["FleetConfig"] < order["InstallFinalize"], "deferred: inside the script"


def test_the_carried_fleet_checker_is_the_real_one(msi: Path, tmp_path: Path) -> None:
    subprocess.run(["msiextract", "-C", str(tmp_path), str(msi)], capture_output=True, check=True)
    (pyz,) = tmp_path.rglob("fleet-check.pyz")
    bad = tmp_path / "fleet.toml"
    bad.write_text("max_cpu_percent = 150\n")
    done = subprocess.run(
        [sys.executable, str(pyz), "check", str(bad)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 4
    assert "max_cpu_percent" in done.stderr
    placeholders = [p for p in tmp_path.rglob("*.exe") if b"PLACEHOLDER" in p.read_bytes()]
    assert len(placeholders) == 3, "the executables are placeholders, and say so"


def test_a_non_numeric_version_is_refused(tmp_path: Path) -> None:
    done = subprocess.run(
        [str(REPO / "installer/build-msi"), "--version", "1.0~rc1", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 2
    assert "X.Y.Z" in done.stderr
    assert not list(tmp_path.iterdir())
