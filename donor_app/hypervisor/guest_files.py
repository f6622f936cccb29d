"""A guest's files on this host, under `<state_dir>/guests/<name>/`: its console log, its
boot files from the image cache, and the private copy-on-write overlay a disk guest
writes to (made with qemu-img; the cached base image is never written to). A disk
guest's overlay saved on another donor is taken in only once checked (overlays.py).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from donor_app.domain.vm import DiskBoot, KernelBoot, VmSpec
from donor_app.hypervisor import overlays
from donor_app.hypervisor.errors import HypervisorError, ImageError
from donor_app.hypervisor.images import ImageCache
from donor_app.hypervisor.xml import BootFiles

OVERLAY_FILE = "disk.qcow2"  # a disk guest's writes, in its guest directory


class GuestFiles:
    """The guests' directories under `state_dir`, their boot files from `images`."""

    def __init__(self, state_dir: Path, images: ImageCache) -> None:
        self.state_dir = state_dir
        self.images = images

    def guest_dir(self, guest: str) -> Path:
        return self.state_dir / "guests" / guest

    def make_guest_dir(self, guest: str) -> Path:
        guest_dir = self.guest_dir(guest)
        guest_dir.mkdir(parents=True, exist_ok=True)
        guest_dir.chmod(0o755)  # QEMU (another user under qemu:///system) writes in it
        return guest_dir

    def remove(self, guest: str) -> None:
        shutil.rmtree(self.guest_dir(guest), ignore_errors=True)

    def guests(self) -> list[str]:
        """The guests that have a directory here."""
        try:
            return sorted(path.name for path in (self.state_dir / "guests").iterdir())
        except FileNotFoundError:
            return []

    def console_path(self, guest: str) -> Path:
        """The file the guest's serial console is written to."""
        return self.guest_dir(guest) / "console.log"

    def boot_files(self, spec: VmSpec) -> BootFiles:
        """The kernel (and initrd) from the image cache, or a fresh overlay on the cached
        disk image; the guest's directory must exist."""
        try:
            if isinstance(spec.boot, KernelBoot):
                initrd = (
                    self.images.path(spec.boot.initrd_sha256) if spec.boot.initrd_sha256 else None
                )
                return BootFiles(kernel=self.images.path(spec.boot.kernel_sha256), initrd=initrd)
            assert isinstance(spec.boot, DiskBoot)
            base = self.images.path(spec.boot.disk_sha256)
        except ImageError as exc:
            raise exc.for_guest(spec.name) from exc
        overlay = self.guest_dir(spec.name) / OVERLAY_FILE
        _run_qemu_img(
            spec.name, "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(base), str(overlay)
        )
        # The guest's disk writes: private to us (libvirt hands the file to QEMU's user
        # while the guest runs, and back afterwards).
        overlay.chmod(0o600)
        return BootFiles(disk_overlay=overlay)

    def for_arrival(self, spec: VmSpec) -> tuple[BootFiles, Path]:
        """The boot files and console log for a guest arriving from another host by live
        migration; creates its directory. Only kernel-boot guests move: a disk guest's
        overlay holds state that a live migration here does not copy."""
        if isinstance(spec.boot, DiskBoot):
            raise HypervisorError(
                "prepare_files", spec.name, "live migration of disk guests is not supported"
            )
        self.make_guest_dir(spec.name)
        return self.boot_files(spec), self.console_path(spec.name)

    def disk_overlay(self, guest: str) -> Path | None:
        """The disk guest's private overlay (its disk writes), None for a kernel guest."""
        overlay = self.guest_dir(guest) / OVERLAY_FILE
        return overlay if overlay.exists() else None

    def adopt_overlay(self, spec: VmSpec, overlay: Path) -> tuple[BootFiles, Path]:
        """Move a disk guest's overlay saved on another host into its directory here and
        point it at this host's copy of the base image (the same content: its sha256
        names it). Returns the boot files and console log.

        The overlay is checked first, before anything opens a file it names
        (overlays.py): HypervisorError, and nothing taken in, for one that is not a plain
        qcow2 over the base image.
        """
        assert isinstance(spec.boot, DiskBoot)
        try:
            base = self.images.path(spec.boot.disk_sha256)
        except ImageError as exc:
            raise exc.for_guest(spec.name) from exc
        try:
            backing = overlays.check_header(overlay, spec.boot.disk_sha256)
            overlays.check_with_qemu_img(overlay, backing)
        except overlays.OverlayError as exc:
            raise HypervisorError("restore", spec.name, f"disk overlay refused: {exc}") from exc
        placed = self.make_guest_dir(spec.name) / OVERLAY_FILE
        shutil.move(overlay, placed)
        # -u: only the backing file's name changes (the one it named is never opened); its
        # content is the same image.
        _run_qemu_img(
            spec.name, "rebase", "-u", "-f", "qcow2", "-F", "qcow2", "-b", str(base), str(placed)
        )
        try:
            overlays.check_chain(placed, base)
        except overlays.OverlayError as exc:
            raise HypervisorError("restore", spec.name, f"disk overlay refused: {exc}") from exc
        return BootFiles(disk_overlay=placed), self.console_path(spec.name)


def _run_qemu_img(guest: str, command: str, *args: str) -> None:
    qemu_img = shutil.which("qemu-img")
    if qemu_img is None:
        raise HypervisorError(command, guest, "qemu-img not found (Debian: qemu-utils)")
    result = subprocess.run([qemu_img, command, *args], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise HypervisorError(command, guest, f"qemu-img {command}: {result.stderr.strip()}")
