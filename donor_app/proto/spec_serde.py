"""A workload's spec (`VmSpec` and its priority) ↔ `WorkloadSpec`, checked on the way in.

Shared by the donor link (RunWorkload, PrepareMigration) and the admin API.
"""

from __future__ import annotations

from donor_app.domain.vm import DiskBoot, KernelBoot, VmSpec
from donor_app.proto.checks import WireError
from donor_app.proto.v1 import coordinator_pb2 as pb

MAX_PRIORITY = 1_000_000


def spec_to_proto(spec: VmSpec, priority: int = 0) -> pb.WorkloadSpec:
    message = pb.WorkloadSpec(
        name=spec.name,
        vcpus=spec.vcpus,
        memory_mib=spec.memory_mib,
        arch=spec.arch,
        priority=priority,
        network=spec.network,
    )
    if isinstance(spec.boot, KernelBoot):
        message.kernel.CopyFrom(
            pb.KernelBoot(
                kernel_sha256=spec.boot.kernel_sha256,
                initrd_sha256=spec.boot.initrd_sha256 or "",
                cmdline=spec.boot.cmdline,
            )
        )
    else:
        message.disk.CopyFrom(pb.DiskBoot(disk_sha256=spec.boot.disk_sha256))
    return message


def spec_from_proto(message: pb.WorkloadSpec, path: str = "spec") -> tuple[VmSpec, int]:
    """(VmSpec, priority). Raises WireError naming the field."""
    boot: KernelBoot | DiskBoot
    try:
        kind = message.WhichOneof("boot")
        if kind == "kernel":
            boot = KernelBoot(
                kernel_sha256=message.kernel.kernel_sha256,
                initrd_sha256=message.kernel.initrd_sha256 or None,
                cmdline=message.kernel.cmdline or "console=ttyS0",
            )
        elif kind == "disk":
            boot = DiskBoot(disk_sha256=message.disk.disk_sha256)
        else:
            raise ValueError("boot: give a kernel or a disk")
        spec = VmSpec(
            name=message.name,
            vcpus=message.vcpus,
            memory_mib=message.memory_mib,
            boot=boot,
            network=message.network,
            arch=message.arch or "x86_64",
        )
    except ValueError as error:
        raise WireError(f"{path}.{error}") from None
    if not -MAX_PRIORITY <= message.priority <= MAX_PRIORITY:
        raise WireError(f"{path}.priority: {message.priority} is outside ±{MAX_PRIORITY}")
    return spec, message.priority
