"""Choosing the domain type: hardware virtualisation (kvm) where it works, else TCG (qemu).

"/dev/kvm exists" is not enough: on nested or restricted hosts the device is there but
the CPU has no vmx/svm and guests hang or abort after minutes. So both must hold.
"""

from __future__ import annotations

import os
from pathlib import Path

VIRT_TYPE_ENV = "DONOR_VIRT_TYPE"


def cpu_has_virtualization(cpuinfo: str) -> bool:
    """True when /proc/cpuinfo's flags include Intel VT-x (vmx) or AMD-V (svm)."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags" and {"vmx", "svm"} & set(value.split()):
            return True
    return False


def kvm_device_usable(device: Path = Path("/dev/kvm")) -> bool:
    return os.access(device, os.R_OK | os.W_OK)


def choose_virt_type(
    uri: str,
    override: str | None = None,
    *,
    cpuinfo_path: Path = Path("/proc/cpuinfo"),
    kvm_device: Path = Path("/dev/kvm"),
) -> str:
    """Return "test", "kvm" or "qemu" for domains on `uri`.

    `override` (or the DONOR_VIRT_TYPE environment variable) wins, so an admin can force
    TCG on a host where KVM misbehaves, or KVM where probing is too cautious.
    """
    forced = override or os.environ.get(VIRT_TYPE_ENV)
    if forced:
        if forced not in ("kvm", "qemu", "test"):
            raise ValueError(f"{VIRT_TYPE_ENV}: {forced!r} is not one of kvm, qemu, test")
        return forced
    if uri.startswith("test:"):
        return "test"
    try:
        cpuinfo = cpuinfo_path.read_text()
    except OSError:
        return "qemu"
    if cpu_has_virtualization(cpuinfo) and kvm_device_usable(kvm_device):
        return "kvm"
    return "qemu"
