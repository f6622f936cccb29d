"""The tiny guest as tests and benchmarks use it: images in a cache, a spec, its console."""

from __future__ import annotations

import os
import re
from pathlib import Path

from donor_app.domain.vm import KernelBoot, VmSpec
from donor_app.hypervisor.images import ImageCache
from tests.guest.build_guest import build_guest

TICK = re.compile(rb"^tick (\d+) ", re.MULTILINE)


def add_tiny_guest(cache: ImageCache) -> tuple[str, str]:
    """Build (once) and add the tiny guest's kernel and initrd; return their sha256s."""
    image = build_guest()
    return cache.add_file(image.kernel), cache.add_file(image.initrd)


def tiny_guest_spec(
    name: str, images: tuple[str, str], mode: str = "sleep", memory_mib: int = 256
) -> VmSpec:
    kernel, initrd = images
    cmdline = f"console=ttyS0 quiet donor.mode={mode} donor.interval_ms=50"
    return VmSpec(name, 1, memory_mib, KernelBoot(kernel, initrd, cmdline))


def qemu_uri(root: Path) -> str:
    """A private QEMU driver for this test run: embedded as root, the session otherwise."""
    if os.geteuid() == 0:
        return f"qemu:///embed?root={root}"
    return "qemu:///session"


def console_ticks(console: Path) -> list[int]:
    """The counter values the guest has printed so far, in order."""
    try:
        data = console.read_bytes()
    except FileNotFoundError:
        return []
    return [int(n) for n in TICK.findall(data)]


def shared_tmp_dir(path: Path) -> Path:
    """Make `path` traversable by the QEMU user (libvirt-qemu), which reads files under it."""
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o755)
    return path
