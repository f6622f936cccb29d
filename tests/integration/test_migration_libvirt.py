"""Live migration, and restore from another host's save, between two donors' libvirtd;
and what each guest gets of its donor (a network of its own, a console file with a cap).

Two private libvirt daemons (tests/libvirtd.py) stand for two donor machines; each has a
Hypervisor with its own image cache and state dir, so every host-local path differs as
it would between machines. The tiny guest's counter on its serial console shows that a
guest kept its state: after a move it goes on from where it was, it does not restart.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import shutil
import subprocess
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from contextlib import suppress
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

import libvirt
import pytest

from donor_app.agent.link.workloads import FleetWorkloads, WorkloadError
from donor_app.domain import link
from donor_app.domain.guest import GuestState
from donor_app.domain.vm import DiskBoot, KernelBoot, VmSpec
from donor_app.hypervisor.consoles import MAX_BYTES as CONSOLE_MAX_BYTES
from donor_app.hypervisor.errors import HypervisorError
from donor_app.hypervisor.host import Hypervisor
from donor_app.hypervisor.images import ImageCache
from donor_app.hypervisor.migration import (
    MigrationError,
    MigrationOptions,
    MigrationProgress,
    MigrationTarget,
)
from donor_app.hypervisor.xml import BootFiles
from tests.guests import TICK, add_tiny_guest, console_ticks, shared_tmp_dir, tiny_guest_spec
from tests.libvirtd import LibvirtDaemon, option, running_libvirtd
from tests.ticks import TickWatcher, check_continuity
from tests.waiting import wait_for

pytestmark = [pytest.mark.qemu, pytest.mark.slow]
_names = itertools.count()
LOOPBACK = "tcp://127.0.0.1"


@dataclass
class Donor:
    """One "machine": its libvirtd and the Hypervisor the agent there would use."""

    daemon: LibvirtDaemon
    hv: Hypervisor
    images: tuple[str, str]
    home: Path

    def reconnect(self) -> None:
        """After the daemon was killed: start it again and open a new connection."""
        with suppress(HypervisorError):
            self.hv.close()
        if self.daemon.pid is None:
            self.daemon.start()
        self.hv = _open_hypervisor(self.daemon, self.home)

    def target_for(self, spec: VmSpec) -> MigrationTarget:
        files, console = self.hv.prepare_files(spec)
        return MigrationTarget(self.daemon.uri, LOOPBACK, files, console)


def _open_hypervisor(daemon: LibvirtDaemon, home: Path) -> Hypervisor:
    return Hypervisor.open(daemon.uri, images=ImageCache(home / "images"), state_dir=home / "state")


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    # Short, under /tmp: the daemons' Unix sockets must stay under 108 bytes, and QEMU
    # (user libvirt-qemu) must traverse it to the images and consoles.
    path = shared_tmp_dir(Path(tempfile.mkdtemp(prefix="mg-", dir="/tmp")))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def donor_pair(workdir: Path) -> Iterator[tuple[Donor, Donor]]:
    with running_libvirtd(workdir, "a") as daemon_a, running_libvirtd(workdir, "b") as daemon_b:
        donors = []
        for daemon in (daemon_a, daemon_b):
            home = shared_tmp_dir(workdir / f"donor-{daemon.name}")
            images = add_tiny_guest(ImageCache(home / "images"))
            donors.append(Donor(daemon, _open_hypervisor(daemon, home), images, home))
        try:
            yield donors[0], donors[1]
        finally:
            for donor in donors:
                with suppress(HypervisorError):
                    donor.hv.close()


@pytest.fixture
def donors(donor_pair: tuple[Donor, Donor]) -> Iterator[tuple[Donor, Donor]]:
    """Both donors up (a test may have killed one); their guests removed afterwards."""
    for donor in donor_pair:
        if donor.daemon.pid is None:
            donor.reconnect()
    yield donor_pair
    for donor in donor_pair:
        if donor.daemon.pid is None:
            continue
        for guest in donor.hv.list_guests():
            donor.hv.undefine(guest)


def _start_guest(donor: Donor) -> VmSpec:
    spec = tiny_guest_spec(f"m{next(_names)}", donor.images)
    donor.hv.create(spec)
    _wait_ticking(donor, spec.name, beyond=2)
    return spec


def _wait_ticking(donor: Donor, guest: str, beyond: int) -> list[int]:
    """Wait until the guest's counter on this donor passes `beyond`; all ticks so far."""
    console = donor.hv.console_path(guest)
    wait_for(
        lambda: any(t > beyond for t in console_ticks(console)),
        60,
        f"{guest} on {donor.daemon.name} to print ticks beyond {beyond}",
        interval=0.05,
    )
    return console_ticks(console)


def _assert_runs_on(donor: Donor, guest: str) -> None:
    assert donor.hv.state(guest) is GuestState.RUNNING
    last = console_ticks(donor.hv.console_path(guest))[-1]
    _wait_ticking(donor, guest, beyond=last)


def _inactive_xml(donor: Donor, guest: str) -> str:
    conn = libvirt.open(donor.daemon.uri)
    try:
        return str(
            conn.lookupByName(Hypervisor.domain_name(guest)).XMLDesc(
                libvirt.VIR_DOMAIN_XML_INACTIVE
            )
        )
    finally:
        conn.close()


def _migrate_and_check(source: Donor, target: Donor, spec: VmSpec) -> None:
    """Move a running guest live and check it went on counting where it was."""
    guest = spec.name
    destination = target.target_for(spec)
    seen: list[MigrationProgress] = []
    # The source's guest dir goes once the guest has left: keep its console open.
    with source.hv.console_path(guest).open("rb") as source_console:
        outcome = source.hv.migrate_live(
            guest, destination, MigrationOptions(deadline_s=60), seen.append
        )
        source_ticks = [int(n) for n in TICK.findall(source_console.read())]
    assert not source.hv.exists(guest), "the source still has the guest (even defined)"
    assert not source.hv.guest_dir(guest).exists()
    assert target.hv.state(guest) is GuestState.RUNNING
    assert target.hv.arrived(guest)
    after = _wait_ticking(target, guest, beyond=source_ticks[-1])
    # Continued, not rebooted (that would restart at 1), nothing printed twice.
    assert source_ticks[-1] < after[0] <= source_ticks[-1] + 2, (source_ticks[-5:], after[:5])
    assert outcome.seconds > 0
    assert outcome.downtime_ms is not None and 0 < outcome.downtime_ms < 5_000, outcome
    assert outcome.data_mib > 0
    assert seen, "progress was never reported"
    # The target's persistent definition names its own files, not the source's.
    inactive = _inactive_xml(target, guest)
    assert str(destination.files.kernel) in inactive
    assert str(destination.console_log) in inactive
    assert str(source.home) not in inactive


def test_live_migration_there_and_back(donors: tuple[Donor, Donor]):
    a, b = donors
    spec = _start_guest(a)
    _migrate_and_check(a, b, spec)
    _migrate_and_check(b, a, spec)
    assert not b.hv.exists(spec.name)


def test_a_moved_guest_runs_on_the_same_cpu_there_and_back(donors: tuple[Donor, Donor]):
    # Each host's QEMU is started with the CPU the guest's own definition names, not with
    # what libvirt expanded a default model to on the host it came from.
    a, b = donors
    spec = _start_guest(a)
    domain = Hypervisor.domain_name(spec.name)
    started_with = option(a.daemon.qemu_args(domain), "-cpu")
    assert started_with is not None
    for source, target in ((a, b), (b, a)):
        source.hv.migrate_live(spec.name, target.target_for(spec), MigrationOptions())
        assert option(target.daemon.qemu_args(domain), "-cpu") == started_with, target.daemon.name
        _assert_runs_on(target, spec.name)


def test_a_migration_past_its_deadline_is_aborted_and_the_guest_stays(
    donors: tuple[Donor, Donor],
):
    a, b = donors
    spec = _start_guest(a)
    options = MigrationOptions(bandwidth_mibps=1, deadline_s=2)
    started = time.monotonic()
    with pytest.raises(MigrationError, match=r"aborted after \d+\.\d s \(deadline 2 s\)") as caught:
        a.hv.migrate_live(spec.name, b.target_for(spec), options)
    took = time.monotonic() - started
    assert 2 <= took < 20, f"the abort took {took:.1f} s"
    assert caught.value.source_state is GuestState.RUNNING
    _assert_runs_on(a, spec.name)
    assert not b.hv.exists(spec.name)


def test_a_target_that_dies_mid_way_leaves_the_guest_running_at_the_source(
    donors: tuple[Donor, Donor],
):
    a, b = donors
    spec = _start_guest(a)
    observed: dict[str, bool] = {}

    def kill_target_once_data_flows(progress: MigrationProgress) -> None:
        if progress.data_processed_mib > 0 and not observed:
            # Mid-way, the target shows the guest arriving (paused, not yet its own).
            observed["exists"] = b.hv.exists(spec.name)
            observed["arrived"] = b.hv.arrived(spec.name)
            b.daemon.kill()

    options = MigrationOptions(bandwidth_mibps=1, deadline_s=60)
    with pytest.raises(MigrationError, match="failed after") as caught:
        a.hv.migrate_live(spec.name, b.target_for(spec), options, kill_target_once_data_flows)
    assert observed == {"exists": True, "arrived": False}, (
        f"the migration ended before any data flowed: {caught.value}"
    )
    assert caught.value.source_state is GuestState.RUNNING
    _assert_runs_on(a, spec.name)
    b.reconnect()  # the donor machine comes back: no trace of the half-arrived guest
    assert not b.hv.exists(spec.name)


def test_an_unreachable_target_fails_at_once_and_leaves_the_guest_alone(
    donors: tuple[Donor, Donor], workdir: Path
):
    a, _ = donors
    spec = _start_guest(a)
    nowhere = MigrationTarget(
        f"qemu+unix:///system?socket={workdir}/nowhere/libvirt-sock",
        LOOPBACK,
        BootFiles(kernel=Path("/nonexistent/kernel"), initrd=Path("/nonexistent/initrd")),
        Path("/nonexistent/console.log"),
    )
    started = time.monotonic()
    with pytest.raises(MigrationError, match="target unreachable") as caught:
        a.hv.migrate_live(spec.name, nowhere, MigrationOptions())
    assert time.monotonic() - started < 5
    assert caught.value.source_state is GuestState.RUNNING
    _assert_runs_on(a, spec.name)


def test_a_guest_saved_on_one_donor_is_restored_on_another(
    donors: tuple[Donor, Donor], workdir: Path
):
    a, b = donors
    spec = _start_guest(a)
    image = workdir / "saves" / f"{spec.name}.save"
    a.hv.save(spec.name, image)
    saved_ticks = console_ticks(a.hv.console_path(spec.name))
    a.hv.undefine(spec.name)  # the guest now lives in the file only

    other = tiny_guest_spec("not-" + spec.name, b.images)
    with pytest.raises(HypervisorError, match="does not fit this guest: name"):
        b.hv.restore_elsewhere(other, image)
    assert not b.hv.exists(other.name)
    assert not b.hv.guest_dir(other.name).exists()

    b.hv.restore_elsewhere(spec, image)
    assert b.hv.state(spec.name) is GuestState.RUNNING
    after = _wait_ticking(b, spec.name, beyond=saved_ticks[-1])
    assert after[0] == saved_ticks[-1] + 1, (saved_ticks[-5:], after[:5])
    inactive = _inactive_xml(b, spec.name)
    assert str(b.hv.images.path(spec.images()[0])) in inactive
    assert str(a.home) not in inactive


def test_warm_up_has_a_fresh_libvirtd_probe_qemu_before_the_first_guest(workdir: Path) -> None:
    """The probe a first guest (or a first arriving migration) would otherwise wait for."""
    with running_libvirtd(workdir, "w") as daemon:
        probed = daemon.root / "cache" / "qemu" / "capabilities"
        assert not list(probed.glob("*.xml"))
        hv = _open_hypervisor(daemon, shared_tmp_dir(workdir / "donor-w"))
        try:
            hv.warm_up()
            assert list(probed.glob("*.xml"))
        finally:
            hv.close()


class _CoordinatorShelf:
    """What PushCheckpoint/PullCheckpoint do for the agent (their real gRPC side is
    tested in test_coordinator_moves.py): keep the uploaded file, hand it back."""

    def __init__(self, donor_id: str) -> None:
        self.blobs: dict[str, bytes] = {}
        self.donor_id = donor_id

    def push(self, workload_id: str, epoch: int, path: Path, sha256: str) -> link.CheckpointInfo:
        data = path.read_bytes()
        self.blobs[sha256] = data
        return link.CheckpointInfo(sha256, len(data), epoch, datetime.now(UTC), self.donor_id)

    def pull(self, workload_id: str, epoch: int, sha256: str) -> Iterator[bytes]:
        data = self.blobs[sha256]
        for start in range(0, len(data), 1 << 20):
            yield data[start : start + (1 << 20)]


class _NoImages:
    def fetch(self, sha256: str) -> Iterator[bytes]:
        raise AssertionError(f"image {sha256} should be cached already")


def _qemu_io(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["qemu-io", *args], capture_output=True, text=True, check=False)


def test_a_disk_guest_moves_cold_with_its_disk_overlay(
    donors: tuple[Donor, Donor], workdir: Path
) -> None:
    a, b = donors
    base = workdir / f"base-{next(_names)}.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "64M"], check=True)
    sha = a.hv.images.add_file(base)
    assert b.hv.images.add_file(base) == sha
    wid = f"w-disk{next(_names)}"
    spec = VmSpec(wid, 1, 256, DiskBoot(sha))
    shelf = _CoordinatorShelf("donor-a")
    on_a = FleetWorkloads(a.hv, a.home / f"{wid}-a.json", lambda call: call())
    on_b = FleetWorkloads(b.hv, b.home / f"{wid}-b.json", lambda call: call())

    on_a.run(link.RunWorkload(wid, 1, spec), _NoImages())
    assert a.hv.state(wid) is GuestState.RUNNING
    assert on_a.checkpoint(link.Checkpoint(wid, 1), shelf) is None  # saved here only
    # What the guest wrote to its disk (written here while it is saved, as a marker).
    overlay_a = a.hv.guest_dir(wid) / "disk.qcow2"
    assert _qemu_io("-c", "write -P 0x5a 1M 64k", str(overlay_a)).returncode == 0
    info = on_a.checkpoint(link.Checkpoint(wid, 1, upload=True), shelf)
    assert info is not None and _looks_like_tar(shelf.blobs[info.sha256])

    on_b.run(link.RunWorkload(wid, 3, spec, checkpoint=info), _NoImages(), shelf)
    assert b.hv.state(wid) is GuestState.RUNNING
    overlay_b = b.hv.guest_dir(wid) / "disk.qcow2"
    check = _qemu_io("-r", "-U", "-c", "read -P 0x5a 1M 64k", str(overlay_b))
    assert check.returncode == 0 and "Pattern verification failed" not in check.stdout, check
    backing = subprocess.run(
        ["qemu-img", "info", "-U", "--output=json", str(overlay_b)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert json.loads(backing)["backing-filename"] == str(b.hv.images.path(sha))
    assert not list((b.hv.state_dir / "incoming").iterdir())  # nothing left behind

    # A bundle that smuggles anything else in is refused, and nothing is left defined.
    evil = workdir / f"evil-{wid}.tar"
    with tarfile.open(evil, "w") as tar:
        tar.add(overlay_b, arcname="../../escape")
    evil_sha = hashlib.sha256(evil.read_bytes()).hexdigest()
    shelf.blobs[evil_sha] = evil.read_bytes()
    forged = link.CheckpointInfo(evil_sha, evil.stat().st_size, 5, datetime.now(UTC))
    other = f"{wid}x"
    with pytest.raises(WorkloadError, match="unexpected member '../../escape'"):
        on_a.run(
            link.RunWorkload(other, 5, replace(spec, name=other), checkpoint=forged),
            _NoImages(),
            shelf,
        )
    assert not a.hv.exists(other)
    assert not (workdir / "escape").exists()


def _looks_like_tar(data: bytes) -> bool:
    return data[257:262] == b"ustar"


# --- what each guest gets of its donor -----------------------------------------------------


def _interface_network(donor: Donor, guest: str) -> str:
    conn = libvirt.open(donor.daemon.uri)
    try:
        xml = conn.lookupByName(Hypervisor.domain_name(guest)).XMLDesc(0)
    finally:
        conn.close()
    source = ET.fromstring(xml).find("devices/interface/source")
    assert source is not None, "the guest has no network interface"
    return str(source.get("network"))


def _network(donor: Donor, name: str) -> tuple[str, ET.Element] | None:
    """The network's bridge and definition, None if libvirt has no such network."""
    conn = libvirt.open(donor.daemon.uri)
    try:
        try:
            network = conn.networkLookupByName(name)
        except libvirt.libvirtError:
            return None
        return str(network.bridgeName()), ET.fromstring(network.XMLDesc(0))
    finally:
        conn.close()


def _addresses(bridge: str) -> list[dict[str, object]]:
    shown = subprocess.run(
        ["ip", "-json", "address", "show", "dev", bridge],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [address for link in json.loads(shown) for address in link.get("addr_info", [])]


def test_each_networked_guest_gets_an_isolated_network_of_its_own(
    donors: tuple[Donor, Donor],
) -> None:
    a, _ = donors
    specs = [replace(tiny_guest_spec(f"n{next(_names)}", a.images), network=True) for _ in "ab"]
    for spec in specs:
        a.hv.create(spec)
    names = [_interface_network(a, spec.name) for spec in specs]
    assert len(set(names)) == 2, f"the guests share a network: {names}"
    bridges = []
    for name in names:
        found = _network(a, name)
        assert found is not None, name
        bridge, definition = found
        bridges.append(bridge)
        assert 0 < len(bridge) <= 15  # IFNAMSIZ
        assert definition.find("forward") is None  # routed or NATed nowhere
        assert definition.find("ip") is None  # the host has no address there...
        assert _addresses(bridge) == [], bridge  # ...not even an IPv6 link-local one
    assert len(set(bridges)) == 2, f"the guests share a bridge: {bridges}"

    a.hv.undefine(specs[0].name)
    assert _network(a, names[0]) is None
    assert not Path("/sys/class/net", bridges[0]).exists()
    assert _network(a, names[1]) is not None  # the other guest keeps its own
    a.hv.destroy(specs[1].name)
    a.hv.undefine(specs[1].name)
    assert _network(a, names[1]) is None
    assert not Path("/sys/class/net", bridges[1]).exists()


def _mac(donor: Donor, guest: str) -> str:
    conn = libvirt.open(donor.daemon.uri)
    try:
        xml = conn.lookupByName(Hypervisor.domain_name(guest)).XMLDesc(0)
    finally:
        conn.close()
    mac = ET.fromstring(xml).find("devices/interface/mac")
    assert mac is not None
    return str(mac.get("address"))


def test_a_networked_guest_finds_its_own_network_wherever_it_moves(
    donors: tuple[Donor, Donor], workdir: Path
) -> None:
    a, b = donors
    spec = replace(tiny_guest_spec(f"n{next(_names)}", a.images), network=True)
    a.hv.create(spec)
    _wait_ticking(a, spec.name, beyond=2)
    network = _interface_network(a, spec.name)
    mac = _mac(a, spec.name)
    # Live: the target made the guest's network when it got ready; the source dropped its.
    a.hv.migrate_live(spec.name, b.target_for(spec), MigrationOptions())
    _assert_runs_on(b, spec.name)
    assert _network(b, network) is not None
    assert _network(a, network) is None
    # Cold, back: the restored guest keeps its network card's address, on a network of
    # its own again.
    image = workdir / "saves" / f"{spec.name}.save"
    b.hv.save(spec.name, image)
    b.hv.undefine(spec.name)
    assert _network(b, network) is None
    a.hv.restore_elsewhere(spec, image)
    assert a.hv.state(spec.name) is GuestState.RUNNING
    _wait_ticking(a, spec.name, beyond=0)
    assert _interface_network(a, spec.name) == network
    assert _network(a, network) is not None
    assert _mac(a, spec.name) == mac


# A guest that prints as fast as its serial port goes (about 400 KB/s under TCG here).
SPEW = "console=ttyS0 quiet rdinit=/bin/busybox -- yes " + "0123456789abcdef" * 4


def _console_files(console: Path) -> dict[str, int]:
    return {
        path.name: path.stat().st_size
        for path in console.parent.glob(console.name + "*")
        if path.is_file()
    }


def _largest_until(console: Path, done: Callable[[], bool], timeout: float) -> int:
    """Watch the console file until `done()`; the largest size it had meanwhile."""
    largest = 0
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, f"{console}: not done after {timeout} s"
        with suppress(FileNotFoundError):
            largest = max(largest, console.stat().st_size)
        time.sleep(0.005)
    return largest


def _spewing_guest(donor: Donor, hv: Hypervisor) -> tuple[str, Path]:
    kernel, initrd = donor.images
    spec = VmSpec(f"s{next(_names)}", 1, 256, KernelBoot(kernel, initrd, SPEW))
    hv.create(spec)
    return spec.name, hv.console_path(spec.name)


def test_a_guest_that_prints_without_end_does_not_grow_its_console_past_the_cap(
    donors: tuple[Donor, Donor],
) -> None:
    # Under libvirtd the console goes through virtlogd, which rolls the file over before it
    # would pass its max_size (2 MiB, as the agent's own cap): the file never passes it.
    a, _ = donors
    guest, console = _spewing_guest(a, a.hv)
    backup = console.with_name(console.name + ".0")
    largest = _largest_until(
        console, lambda: backup.exists() and console.stat().st_size > 64 * 1024, timeout=120
    )
    assert largest <= CONSOLE_MAX_BYTES
    files = _console_files(console)
    assert all(size <= CONSOLE_MAX_BYTES for size in files.values()), files
    a.hv.undefine(guest)


def _capped_hypervisor(donor: Donor, console_max_bytes: int) -> Hypervisor:
    return Hypervisor.open(
        donor.daemon.uri,
        images=donor.hv.images,
        state_dir=donor.home / f"state-{next(_names)}",
        console_max_bytes=console_max_bytes,
    )


def test_the_agent_trims_a_console_that_passes_its_cap(donors: tuple[Donor, Donor]) -> None:
    # Where nothing rolls the file over (an embedded driver writes it itself), the agent
    # trims it: never more than the cap plus what the guest prints between two looks.
    a, _ = donors
    cap = 256 * 1024
    hv = _capped_hypervisor(a, cap)
    try:
        guest, console = _spewing_guest(a, hv)
        backup = console.with_name(console.name + ".0")
        backups: set[int] = set()

        def trimmed_twice() -> bool:
            with suppress(FileNotFoundError):
                backups.add(backup.stat().st_mtime_ns)
            return len(backups) >= 2

        largest = _largest_until(console, trimmed_twice, timeout=120)
        assert largest < 2 * cap, f"the console reached {largest} bytes (cap {cap})"
        files = _console_files(console)
        assert set(files) <= {console.name, backup.name}, files
        hv.undefine(guest)
    finally:
        hv.close()


def test_ticks_are_read_on_across_a_trimmed_console(donors: tuple[Donor, Donor]) -> None:
    a, _ = donors
    hv = _capped_hypervisor(a, 4096)
    try:
        kernel, initrd = a.images
        cmdline = "console=ttyS0 quiet donor.mode=sleep donor.interval_ms=5"
        spec = VmSpec(f"t{next(_names)}", 1, 256, KernelBoot(kernel, initrd, cmdline))
        console = hv.console_path(spec.name)
        backup = console.with_name(console.name + ".0")
        with TickWatcher({"here": console}) as watcher:
            hv.create(spec)
            wait_for(backup.exists, 60, "the console to be trimmed once")
            trimmed_at = watcher.last()
            assert trimmed_at is not None
            wait_for(
                lambda: (last := watcher.last()) is not None and last.value > trimmed_at.value + 50,
                60,
                "ticks after the trim",
            )
        ticks = watcher.ticks()
        check_continuity(ticks)
        assert len(ticks) > 100
        hv.undefine(spec.name)
    finally:
        hv.close()
