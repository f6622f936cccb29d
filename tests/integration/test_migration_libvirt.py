"""Live migration, and restore from another host's save, between two donors' libvirtd.

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
from collections.abc import Iterator
from contextlib import suppress
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

import libvirt
import pytest

from donor_app.agent.link.workloads import FleetWorkloads, WorkloadError
from donor_app.domain import link
from donor_app.domain.guest import GuestState
from donor_app.domain.vm import DiskBoot, VmSpec
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
