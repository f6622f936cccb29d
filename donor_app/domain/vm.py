"""What a guest is: the validated description every layer agrees on.

A VmSpec is checked when it is made, so the hypervisor can build domain XML from it
without re-checking, and so a user's mistake is reported with the field and the allowed
range before anything reaches libvirt.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
SHA256_PATTERN = re.compile(r"^[0-9a-f]{64}$")
MIN_VCPUS, MAX_VCPUS = 1, 64
# A guest with 64 MiB or less does not boot the cloud kernel (tried); 1 TiB is far
# beyond any workstation and catches unit mistakes (bytes given as MiB).
MIN_MEMORY_MIB, MAX_MEMORY_MIB = 128, 1024 * 1024
MAX_CMDLINE = 1024
ARCHES = ("x86_64", "aarch64")


def _check_sha256(field: str, value: str) -> None:
    if not isinstance(value, str) or not SHA256_PATTERN.fullmatch(value):
        raise ValueError(f"{field}: {value!r} is not a sha256 (64 lowercase hex digits)")


def _check_int_range(field: str, value: int, low: int, high: int, unit: str = "") -> None:
    # bool is an int subclass; True vCPUs is a mistake, not 1.
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ValueError(f"{field}: {value!r} is outside the allowed range {low}–{high}{unit}")


@dataclass(frozen=True, slots=True)
class KernelBoot:
    """Direct kernel boot: a kernel and optional initrd from the image cache."""

    kernel_sha256: str
    initrd_sha256: str | None = None
    cmdline: str = "console=ttyS0"

    def __post_init__(self) -> None:
        _check_sha256("boot.kernel_sha256", self.kernel_sha256)
        if self.initrd_sha256 is not None:
            _check_sha256("boot.initrd_sha256", self.initrd_sha256)
        if (
            not isinstance(self.cmdline, str)
            or len(self.cmdline) > MAX_CMDLINE
            or not all(" " <= ch <= "~" for ch in self.cmdline)
        ):
            raise ValueError(
                f"boot.cmdline: must be printable ASCII of at most {MAX_CMDLINE} characters"
            )


@dataclass(frozen=True, slots=True)
class DiskBoot:
    """Boot from a qcow2 base image; the guest writes only to a private overlay."""

    disk_sha256: str

    def __post_init__(self) -> None:
        _check_sha256("boot.disk_sha256", self.disk_sha256)


@dataclass(frozen=True, slots=True)
class VmSpec:
    """A guest: name, size, what it boots, and whether it may have a network.

    `network` False (the default) gives the guest no network device at all; True gives it
    one interface on an isolated network (no route to the host or anywhere else).
    """

    name: str
    vcpus: int
    memory_mib: int
    boot: KernelBoot | DiskBoot
    network: bool = False
    arch: str = "x86_64"

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not NAME_PATTERN.fullmatch(self.name):
            raise ValueError(
                f"name: {self.name!r} is not allowed: use 1–63 characters of a–z, 0–9 and '-',"
                " starting with a letter or digit"
            )
        _check_int_range("vcpus", self.vcpus, MIN_VCPUS, MAX_VCPUS)
        _check_int_range("memory_mib", self.memory_mib, MIN_MEMORY_MIB, MAX_MEMORY_MIB, " MiB")
        if not isinstance(self.boot, KernelBoot | DiskBoot):
            raise ValueError("boot: must be a KernelBoot or a DiskBoot")
        if not isinstance(self.network, bool):
            raise ValueError(f"network: {self.network!r} must be true or false")
        if self.arch not in ARCHES:
            raise ValueError(f"arch: {self.arch!r} is not one of {', '.join(ARCHES)}")

    def images(self) -> tuple[str, ...]:
        """The sha256 of every image the guest boots from."""
        if isinstance(self.boot, KernelBoot):
            return tuple(s for s in (self.boot.kernel_sha256, self.boot.initrd_sha256) if s)
        return (self.boot.disk_sha256,)
