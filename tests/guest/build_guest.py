"""Build the tiny guest (kernel + busybox initramfs) from Debian packages, once.

The result is cached under a directory named by the sha256 of everything that goes into
it (kernel, modules, busybox, /init, this builder's format version), so a second call
costs a few hashes. Used by the tests, the benchmarks and the demo.

    python -m tests.guest.build_guest            # prints {"kernel": …, "initrd": …} as JSON
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import platformdirs

FORMAT_VERSION = "1"
VIRTIO_MODULES = (
    "virtio_ring",
    "virtio",
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_pci",
    "virtio_balloon",
)
INIT_SCRIPT = Path(__file__).with_name("init.sh")
BUSYBOX = Path("/bin/busybox")


class GuestBuildError(RuntimeError):
    """The host lacks what the guest is built from (names the missing package)."""


@dataclass(frozen=True)
class GuestImage:
    kernel: Path
    initrd: Path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def find_cloud_kernel(boot: Path = Path("/boot")) -> tuple[Path, Path]:
    """Return (vmlinuz, modules dir) of the newest installed Debian cloud kernel."""
    kernels = sorted(boot.glob("vmlinuz-*-cloud-amd64"))
    if not kernels:
        raise GuestBuildError(
            "no /boot/vmlinuz-*-cloud-amd64: install the Debian package linux-image-cloud-amd64"
        )
    kernel = kernels[-1]
    version = kernel.name.removeprefix("vmlinuz-")
    modules = Path("/lib/modules") / version / "kernel" / "drivers" / "virtio"
    if not modules.is_dir():
        raise GuestBuildError(f"kernel {version} has no virtio modules at {modules}")
    return kernel, modules


def _inputs() -> list[tuple[str, Path]]:
    kernel, modules = find_cloud_kernel()
    if not BUSYBOX.exists():
        raise GuestBuildError("no /bin/busybox: install the Debian package busybox-static")
    items = [("vmlinuz", kernel), ("busybox", BUSYBOX), ("init", INIT_SCRIPT)]
    for name in VIRTIO_MODULES:
        module = modules / f"{name}.ko"
        if not module.exists():
            raise GuestBuildError(f"missing kernel module {module}")
        items.append((f"{name}.ko", module))
    return items


def _cache_key(inputs: list[tuple[str, Path]]) -> str:
    digest = hashlib.sha256(f"donor-guest-v{FORMAT_VERSION}".encode())
    for name, path in inputs:
        digest.update(f"{name}={_sha256(path)}\n".encode())
    return digest.hexdigest()[:32]


def _make_initramfs(inputs: dict[str, Path], out: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="donor-initramfs-") as tmp:
        root = Path(tmp)
        for sub in ("bin", "proc", "sys", "dev", "lib/modules"):
            (root / sub).mkdir(parents=True)
        shutil.copy2(inputs["busybox"], root / "bin" / "busybox")
        (root / "bin" / "sh").symlink_to("busybox")
        shutil.copy2(inputs["init"], root / "init")
        (root / "init").chmod(0o755)
        for name in VIRTIO_MODULES:
            shutil.copy2(inputs[f"{name}.ko"], root / "lib" / "modules" / f"{name}.ko")
        names = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
        archive = subprocess.run(
            ["cpio", "--quiet", "-o", "-H", "newc", "--owner=0:0"],
            cwd=root,
            input="\n".join(names).encode(),
            capture_output=True,
            check=True,
        ).stdout
    # mtime=0 keeps the initrd byte-identical across builds.
    out.write_bytes(gzip.compress(archive, mtime=0))


def default_cache_dir() -> Path:
    return Path(
        os.environ.get("DONOR_GUEST_CACHE") or platformdirs.user_cache_path("donor-app") / "guest"
    )


def build_guest(cache_dir: Path | None = None) -> GuestImage:
    """Return the tiny guest's kernel and initrd, building them on first use."""
    if shutil.which("cpio") is None:
        raise GuestBuildError("no cpio: install the Debian package cpio")
    inputs = _inputs()
    target = (cache_dir or default_cache_dir()) / _cache_key(inputs)
    image = GuestImage(kernel=target / "vmlinuz", initrd=target / "initrd.img")
    if image.kernel.exists() and image.initrd.exists():
        return image
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".build-", dir=target.parent))
    try:
        by_name = dict(inputs)
        shutil.copyfile(by_name["vmlinuz"], staging / "vmlinuz")
        _make_initramfs(by_name, staging / "initrd.img")
        for path in staging.iterdir():
            # QEMU under qemu:///system runs as libvirt-qemu and must read these.
            path.chmod(0o644)
        staging.chmod(0o755)
        try:
            staging.rename(target)
        except OSError:
            if not target.exists():  # someone else won the race: fine, else re-raise
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return image


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cache-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    try:
        image = build_guest(args.cache_dir)
    except GuestBuildError as exc:
        print(f"build_guest: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({"kernel": str(image.kernel), "initrd": str(image.initrd)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
