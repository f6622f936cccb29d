"""What the agent writes of a fleet guest is its own, whatever the umask: a checkpoint
downloaded to restore (a guest's memory, and a disk guest's overlay), the bundle it
uploads, and an image on its way into the cache are 0600 in 0700 directories.

The hypervisor is a stand-in that looks at the files when the agent hands them over;
the real libvirt calls are in tests/integration.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import cast

import pytest

from donor_app.agent.link.bundle import write_bundle
from donor_app.agent.link.workloads import FleetWorkloads
from donor_app.domain import link
from donor_app.domain.guest import GuestState
from donor_app.domain.vm import DiskBoot, KernelBoot, VmSpec
from donor_app.hypervisor.host import Hypervisor
from donor_app.hypervisor.images import ImageCache

SAVED = b"LibvirtQemudSave" + b"guest memory" * 1000
OVERLAY = b"QFI\xfb" + b"disk writes" * 1000


@pytest.fixture(params=[0o022, 0o000], ids=["umask-022", "umask-000"])
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


class Hv:
    """Notes the modes of the files the agent hands over, when it hands them over."""

    def __init__(self, root: Path, overlay: Path | None = None) -> None:
        self.state_dir = root / "state"
        self.images = ImageCache(root / "images")
        self.guests: dict[str, GuestState] = {}
        self.overlay = overlay
        self.seen: dict[str, int] = {}

    def guest_dir(self, guest: str) -> Path:
        return self.state_dir / "guests" / guest

    def exists(self, guest: str) -> bool:
        return guest in self.guests

    def state(self, guest: str) -> GuestState:
        return self.guests[guest]

    def create(self, spec: VmSpec) -> None:
        self.guests[spec.name] = GuestState.RUNNING

    def restore_elsewhere(
        self, spec: VmSpec, save_path: Path, *, disk_overlay: Path | None = None
    ) -> None:
        self.seen["state"] = _mode(save_path)
        self.seen["state dir"] = _mode(save_path.parent)
        self.seen["incoming"] = _mode(self.state_dir / "incoming")
        if disk_overlay is not None:
            self.seen["overlay"] = _mode(disk_overlay)
            self.seen["overlay dir"] = _mode(disk_overlay.parent)
        self.guests[spec.name] = GuestState.RUNNING

    def save(self, guest: str, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # libvirt writes its save files 0600 itself.
        path.write_bytes(SAVED)
        path.chmod(0o600)
        self.guests[guest] = GuestState.SHUTOFF

    def disk_overlay(self, guest: str) -> Path | None:
        return self.overlay


class Transport:
    def __init__(self, blob: bytes = SAVED) -> None:
        self.blob = blob
        self.pushed_mode: int | None = None

    def push(self, workload_id: str, epoch: int, path: Path, sha256: str) -> link.CheckpointInfo:
        self.pushed_mode = _mode(path)
        return link.CheckpointInfo(sha256, path.stat().st_size, epoch, datetime.now(UTC), "d")

    def pull(self, workload_id: str, epoch: int, sha256: str) -> Iterator[bytes]:
        yield self.blob[:100]
        yield self.blob[100:]


class Images:
    """Serves one image; after the first block, notes what the download looks like."""

    def __init__(self, cache: ImageCache, data: bytes) -> None:
        self.cache = cache
        self.data = data
        self.partial: dict[str, int] = {}

    def fetch(self, sha256: str) -> Iterator[bytes]:
        yield self.data[:10]
        for path in self.cache.root.rglob("*"):
            self.partial[str(path.relative_to(self.cache.root))] = _mode(path)
        yield self.data[10:]


def _workloads(hv: Hv, tmp_path: Path) -> FleetWorkloads:
    return FleetWorkloads(cast(Hypervisor, hv), tmp_path / "fleet.json", lambda fn: fn())


def _checkpoint(blob: bytes) -> link.CheckpointInfo:
    return link.CheckpointInfo(
        hashlib.sha256(blob).hexdigest(), len(blob), 1, datetime.now(UTC), "d-away"
    )


def test_a_downloaded_checkpoint_is_private_until_it_is_removed(tmp_path: Path, umask: int) -> None:
    hv = Hv(tmp_path)
    kernel = hv.images.add_file(_write(tmp_path / "kernel", b"kernel"))
    spec = VmSpec("x", 1, 256, KernelBoot(kernel))
    run = link.RunWorkload("w-1", 2, spec, checkpoint=_checkpoint(SAVED))
    _workloads(hv, tmp_path).run(run, Images(hv.images, b""), Transport())
    assert hv.seen == {"state": 0o600, "state dir": 0o700, "incoming": 0o700}
    assert list((hv.state_dir / "incoming").iterdir()) == []


def test_a_downloaded_disk_checkpoint_unpacks_privately(tmp_path: Path, umask: int) -> None:
    hv = Hv(tmp_path)
    disk = hv.images.add_file(_write(tmp_path / "disk", b"base image"))
    bundle = tmp_path / "bundle"
    write_bundle(_write(tmp_path / "s", SAVED), _write(tmp_path / "o", OVERLAY), bundle)
    blob = bundle.read_bytes()
    run = link.RunWorkload(
        "w-1", 2, VmSpec("x", 1, 256, DiskBoot(disk)), checkpoint=_checkpoint(blob)
    )
    _workloads(hv, tmp_path).run(run, Images(hv.images, b""), Transport(blob))
    assert hv.seen == {
        "state": 0o600,
        "state dir": 0o700,
        "incoming": 0o700,
        "overlay": 0o600,
        "overlay dir": 0o700,
    }


def test_a_disk_guests_bundle_for_upload_is_private(tmp_path: Path, umask: int) -> None:
    overlay = _write(tmp_path / "disk.qcow2", OVERLAY)
    hv = Hv(tmp_path, overlay)
    disk = hv.images.add_file(_write(tmp_path / "disk", b"base image"))
    workloads = _workloads(hv, tmp_path)
    run = link.RunWorkload("w-1", 1, VmSpec("x", 1, 256, DiskBoot(disk)))
    workloads.run(run, Images(hv.images, b""))
    transport = Transport()
    workloads.checkpoint(link.Checkpoint("w-1", 1, upload=True), transport)
    assert transport.pushed_mode == 0o600


def test_an_image_is_downloaded_privately(tmp_path: Path, umask: int) -> None:
    hv = Hv(tmp_path)
    data = b"kernel" * 1000
    sha256 = hashlib.sha256(data).hexdigest()
    images = Images(hv.images, data)
    run = link.RunWorkload("w-1", 1, VmSpec("x", 1, 256, KernelBoot(sha256)))
    _workloads(hv, tmp_path).run(run, images)
    partial = [name for name in images.partial if name.startswith("incoming/")]
    assert len(partial) == 1
    assert images.partial["incoming"] == 0o700
    assert images.partial[partial[0]] == 0o600
    assert _mode(hv.images.path(sha256)) == 0o600


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_a_download_left_by_an_older_agent_is_removed_at_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    hv = Hv(tmp_path)
    incoming = hv.state_dir / "incoming"
    (incoming / "w-1.unpacked").mkdir(parents=True)
    (incoming / "w-1.save").write_bytes(SAVED)
    (incoming / "w-1.unpacked" / "state").write_bytes(SAVED)
    for path in (incoming, incoming / "w-1.unpacked"):
        path.chmod(0o755)
    (incoming / "w-1.save").chmod(0o644)
    with caplog.at_level(logging.INFO):
        _workloads(hv, tmp_path)
    assert list(incoming.iterdir()) == []
    assert _mode(incoming) == 0o700
    assert f"{incoming} had mode 0755" in caplog.text
    assert f"removed {incoming / 'w-1.save'}" in caplog.text
