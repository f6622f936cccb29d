"""The .deb, installed silently into a clean Debian root, against a real coordinator.

The agent is started as its systemd unit would start it (the unit's ExecStart, its
directories and umask; there is no systemd here), with one change: libvirt's test driver
instead of qemu:///system, since the root runs no libvirtd. What the unit's sandboxing
does is systemd's part and is not exercised here; its presence is checked.
"""

from __future__ import annotations

import json
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.coordinator_helpers import RunningCoordinator, enroll, running_coordinator
from tests.installer.conftest import (
    UPGRADE_VERSION,
    VERSION,
    Media,
    connected_donors,
    fleet_for,
    needs_root_tools,
    new_token,
)
from tests.installer.debroot import DebRoot, changed, parse_unit, start_as_unit
from tests.net import free_port
from tests.waiting import wait_for

pytestmark = [pytest.mark.slow, needs_root_tools()]

UNIT = "/lib/systemd/system/donor-agent.service"
TEST_URI = {"--libvirt-uri": "test:///default"}
STATE = ("etc/donor_app/", "var/lib/donor_app/", "var/cache/donor_app/")


def stage(root: DebRoot, *debs: Path) -> None:
    """Copy packages into the root (before a "left behind" snapshot is taken)."""
    for deb in debs:
        target = root.host(f"/srv/pkgs/{deb.name}")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(deb, target)


def install(root: DebRoot, deb: Path, fleet: str | None = None) -> tuple[int, str]:
    """`dpkg -i` a staged package, the fleet config passed as for a silent install."""
    env = {"DONOR_FLEET_CONFIG": fleet} if fleet else {}
    result = root.run(["dpkg", "-i", f"/srv/pkgs/{deb.name}"], env=env)
    return result.returncode, result.output


def mode(path: Path) -> tuple[int, int]:
    st = path.stat()
    return stat.S_IMODE(st.st_mode), st.st_uid


def package_status(root: DebRoot) -> str:
    result = root.run(["dpkg-query", "-W", "-f=${Status} ${Version}", "donor-app"])
    return result.output.strip()


def test_silent_install_enroll_upgrade_remove_purge(
    root: DebRoot,
    media: Media,
    coordinator: RunningCoordinator,
    deb: Path,
    upgrade_deb: Path,
    tmp_path: Path,
) -> None:
    token = new_token(coordinator)
    fleet = fleet_for(coordinator, media, token)
    bad = media.put("bad-fleet.toml", "max_cpu_percent = 150\n")
    stage(root, deb, upgrade_deb)
    before = root.files()

    # --- silent install ---------------------------------------------------------------
    code, output = install(root, deb, fleet)
    assert code == 0, output
    assert "will enroll with the coordinator" in output
    assert package_status(root) == f"install ok installed {VERSION}"

    site = root.host("/etc/donor_app")
    assert mode(site / "fleet.toml") == (0o644, 0)
    assert mode(site / "enroll-token") == (0o600, 0)
    assert (site / "enroll-token").read_text().strip() == token
    assert token not in (site / "fleet.toml").read_text(), "the token must not be world-readable"
    assert (site / "coordinator-ca.pem").read_bytes() == coordinator.ca_pem
    # The landed file is what the installed agent reads: policy kept, files referenced.
    probe = root.run(
        [
            "/opt/donor-app/bin/python3", "-c",
            "from pathlib import Path\n"
            "from donor_app.settings.config import load_fleet, load_link_config\n"
            "f = Path('/etc/donor_app/fleet.toml')\n"
            "p, l = load_fleet(f), load_link_config(f)\n"
            "print(p.max_cpu_percent, p.owner_may_disable, p.blackout[0].label, l.address,"
            " l.token_file, l.token is not None)",
        ]
    )  # fmt: skip
    address = coordinator.endpoints.address
    expected = f"50.0 False nightly backups {address} /etc/donor_app/enroll-token True"
    assert probe.output.strip() == expected, probe.output

    for path in ("/usr/bin/donor-agent", "/usr/bin/donor-app", "/usr/bin/donor-coordinator"):
        assert root.host(path).is_symlink(), path
    autostart = root.host("/etc/xdg/autostart/donor-app.desktop").read_text()
    assert "Exec=/opt/donor-app/bin/donor-app\n" in autostart
    assert root.host("/usr/share/applications/donor-app.desktop").is_file()
    assert root.host("/usr/share/icons/hicolor/scalable/apps/donor-app.svg").is_file()
    unit_text = root.host(UNIT).read_text()
    unit = parse_unit(unit_text)
    assert unit.exec_start[0] == "/opt/donor-app/bin/donor-agent"
    assert unit.exec_start[unit.exec_start.index("--libvirt-uri") + 1] == "qemu:///system"
    assert unit.settings["NoNewPrivileges"] == "yes"
    assert unit.settings["ProtectSystem"] == "strict"
    assert "/etc/donor_app" in unit.settings["ReadWritePaths"]
    assert "After=network-online.target libvirtd.service" in unit_text
    assert set(unit.directories) == {
        "/run/donor_app", "/var/lib/donor_app", "/var/cache/donor_app", "/etc/donor_app",
    }  # fmt: skip
    wants = root.host("/etc/systemd/system/multi-user.target.wants/donor-agent.service")
    assert wants.is_symlink()
    # The coordinator's unit is shipped for the one host that runs it, enabled by hand.
    assert root.host("/lib/systemd/system/donor-coordinator.service").is_file()
    assert not wants.with_name("donor-coordinator.service").exists()

    # --- the agent, started as the unit would, enrolls --------------------------------
    log = tmp_path / "agent.log"
    agent = start_as_unit(root, UNIT, log, TEST_URI)
    donors = wait_for(lambda: connected_donors(coordinator), 180, "the agent to enroll")
    assert len(donors) == 1, donors
    donor_id = donors[0]
    wait_for(lambda: not (site / "enroll-token").exists(), 60, "the used token to be removed")
    credentials = root.host("/var/lib/donor_app/credentials.json")
    assert mode(credentials) == (0o600, 0)
    listed = subprocess.run(
        [sys.executable, "-m", "donor_app.coordinator.cli", "--data-dir",
         str(coordinator.data_dir), "donor", "list", "--json"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert [d["id"] for d in json.loads(listed.stdout) if d["connected"]] == [donor_id]

    # --- a bad fleet config on upgrade: rejected, the running agent left alone ---------
    fleet_before = (site / "fleet.toml").read_bytes()
    code, output = install(root, upgrade_deb, bad)
    assert code != 0
    assert "exit status 4" in output and "max_cpu_percent" in output, output
    assert agent.poll() is None, "a rejected upgrade must not stop the agent"
    assert package_status(root) == f"install ok installed {VERSION}"
    assert (site / "fleet.toml").read_bytes() == fleet_before

    # --- upgrade over the running agent keeps enrollment and settings -----------------
    (site / "settings.toml").write_text("idle_after = 300\n")
    kept = {p: root.host(p).read_bytes() for p in ("/var/lib/donor_app/credentials.json",)}
    code, output = install(root, upgrade_deb)
    assert code == 0, output
    assert "stopping the agent" in output
    assert agent.wait(120) == 0, log.read_text()
    assert package_status(root) == f"install ok installed {UPGRADE_VERSION}"
    assert (site / "fleet.toml").read_bytes() == fleet_before
    assert (site / "settings.toml").read_text() == "idle_after = 300\n"
    assert {p: root.host(p).read_bytes() for p in kept} == kept
    agent = start_as_unit(root, UNIT, log, TEST_URI)
    wait_for(
        lambda: connected_donors(coordinator) == [donor_id], 180, "the same donor to reconnect"
    )

    # --- remove: agent stopped (the coordinator sees it go), files gone, state kept ----
    result = root.run(["dpkg", "--remove", "donor-app"])
    assert result.returncode == 0, result.output
    assert agent.wait(120) == 0
    wait_for(lambda: not connected_donors(coordinator), 120, "the coordinator to see it leave")
    left = changed(before, root.files())
    assert left, "the state should still be there"
    assert all(path.startswith(STATE) for path in left), sorted(left)
    assert root.host("/var/lib/donor_app/credentials.json").exists()
    assert (site / "fleet.toml").exists()

    # --- purge: nothing left behind ---------------------------------------------------
    result = root.run(["dpkg", "--purge", "donor-app"])
    assert result.returncode == 0, result.output
    assert changed(before, root.files()) == set()
    assert "no packages found matching donor-app" in package_status(root)


BAD_CONFIGS = {
    "missing": (None, "exit status 3", "does not exist"),
    "not TOML": ("max_cpu_percent = = 5\n", "exit status 4", "not valid TOML"),
    "out of range": ("max_cpu_percent = 150\n", "exit status 4", "max_cpu_percent"),
    "unknown key": ("max_cpu = 50\n", "exit status 4", "max_cpu"),
    "CA missing": (
        '[coordinator]\naddress = "c.example.org:7443"\nca_file = "/nope.pem"\ntoken = "t"\n',
        "exit status 4",
        "coordinator.ca_file",
    ),
}


@pytest.mark.parametrize("case", BAD_CONFIGS)
def test_bad_fleet_config_fails_before_changing_anything(
    root: DebRoot, media: Media, deb: Path, case: str
) -> None:
    content, status, reason = BAD_CONFIGS[case]
    fleet = media.put("fleet.toml", content) if content else "/srv/media/absent.toml"
    stage(root, deb)
    before = root.files()
    code, output = install(root, deb, fleet)
    assert code == 1, output  # dpkg's code; the script's own is in its message
    assert status in output and reason in output, output
    assert changed(before, root.files()) == set()
    assert not root.host("/opt/donor-app").exists()
    assert not root.host("/etc/donor_app").exists()


def test_debconf_preseeded_fleet_config(
    root: DebRoot, media: Media, coordinator: RunningCoordinator, deb: Path
) -> None:
    fleet = fleet_for(coordinator, media, new_token(coordinator))
    seeded = root.run(
        ["sh", "-c", f"echo 'donor-app donor-app/fleet-config string {fleet}'"
         " | debconf-set-selections"]
    )  # fmt: skip
    assert seeded.returncode == 0, seeded.output
    stage(root, deb)
    code, output = install(root, deb)
    assert code == 0, output
    landed = root.host("/etc/donor_app/fleet.toml").read_text()
    assert f'address = "{coordinator.endpoints.address}"' in landed
    assert mode(root.host("/etc/donor_app/enroll-token")) == (0o600, 0)


def test_spent_token_installs_and_the_agent_reports_refused(
    root: DebRoot, media: Media, coordinator: RunningCoordinator, deb: Path, tmp_path: Path
) -> None:
    # A used single-use token is refused exactly as an expired one (both UNAUTHENTICATED);
    # expiry itself takes a minute at the shortest TTL, so this stands in for it.
    token = new_token(coordinator)
    enroll(coordinator, token, hostname="someone-else")
    stage(root, deb)
    code, output = install(root, deb, fleet_for(coordinator, media, token))
    assert code == 0, output
    log = tmp_path / "agent.log"
    agent = start_as_unit(root, UNIT, log, TEST_URI)
    wait_for(lambda: "enrollment refused" in log.read_text(), 180, "the agent to say refused")
    assert agent.poll() is None, "a refused enrollment must not stop the agent"
    assert root.host("/etc/donor_app/enroll-token").exists(), "kept for the admin to replace"


def link_state(root: DebRoot) -> str:
    """The agent's coordinator link as its local API reports it (asked from inside)."""
    result = root.run(
        [
            "/opt/donor-app/bin/python3", "-c",
            "from pathlib import Path\n"
            "from donor_app.agent.local_client import AgentClient\n"
            "with AgentClient(Path('/run/donor_app/agent.sock'), timeout_s=2) as c:\n"
            "    print(c.status().coordinator.state)",
        ]
    )  # fmt: skip
    return result.output.strip().splitlines()[-1] if result.returncode == 0 else ""


def test_unreachable_coordinator_installs_and_the_agent_enrolls_once_it_is_up(
    root: DebRoot, media: Media, deb: Path, tmp_path: Path
) -> None:
    listen, enroll_listen = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    data = tmp_path / "coordinator"
    # Fixed ports: the coordinator comes back where the installed fleet config expects it.
    # Its first run makes its CA and a token.
    with running_coordinator(data, listen=listen, enroll_listen=enroll_listen) as first_run:
        fleet = fleet_for(first_run, media, new_token(first_run))
    stage(root, deb)
    code, output = install(root, deb, fleet)
    assert code == 0, output
    assert f"enrollment port {enroll_listen} does not answer now" in output
    log = tmp_path / "agent.log"
    agent = start_as_unit(root, UNIT, log, TEST_URI)
    wait_for(lambda: link_state(root) == "disconnected", 180, "the agent to find no coordinator")
    assert root.host("/etc/donor_app/enroll-token").exists()
    with running_coordinator(data, listen=listen, enroll_listen=enroll_listen) as coordinator:
        # Backoff doubles from 1 s (full jitter, 60 s cap): the next try comes within ~30 s.
        wait_for(lambda: connected_donors(coordinator), 180, "the agent to enroll on its own")
    assert agent.poll() is None
    assert not root.host("/etc/donor_app/enroll-token").exists()


DOMAIN = (
    "<domain type='test'><name>{}</name><memory>262144</memory><os><type>hvm</type></os></domain>"
)
NODE_XML = f"<node>{DOMAIN.format('donor-lent')}{DOMAIN.format('owners-own')}</node>"


def test_removal_checkpoints_donor_guests_only(root: DebRoot, media: Media, deb: Path) -> None:
    # What prerm runs after stopping the agent, here against libvirt's test driver (both
    # domains running) instead of the qemu:///system it picks where libvirtd runs.
    node = media.put("node.xml", NODE_XML)
    stage(root, deb)
    code, output = install(root, deb)
    assert code == 0, output
    result = root.run(["/opt/donor-app/libexec/checkpoint-guests", "--uri", f"test://{node}"])
    assert result.returncode == 0, result.output
    assert "guest lent saved to disk" in result.output
    assert "owners" not in result.output
    nothing = root.run(["/opt/donor-app/libexec/checkpoint-guests"])  # no libvirtd here
    assert (nothing.returncode, nothing.output) == (0, "")
