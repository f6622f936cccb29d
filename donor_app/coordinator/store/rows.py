"""The fleet store's rows as domain records and back, and a VmSpec as the JSON the
workloads table keeps. Pure conversions: no connection, no transaction."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Row

from donor_app.coordinator.store.ports import StoreError
from donor_app.domain.records import (
    HELD_STATES,
    Capacity,
    CheckpointRef,
    DonorRecord,
    TokenRecord,
    WorkloadEvent,
    WorkloadRecord,
    WorkloadState,
)
from donor_app.domain.vm import DiskBoot, KernelBoot, VmSpec

# --- VmSpec <-> JSON ------------------------------------------------------------------


def vmspec_to_dict(spec: VmSpec) -> dict[str, Any]:
    """A VmSpec as plain JSON-able data; `boot.kind` tells KernelBoot from DiskBoot."""
    boot: dict[str, Any]
    if isinstance(spec.boot, KernelBoot):
        boot = {
            "kind": "kernel",
            "kernel_sha256": spec.boot.kernel_sha256,
            "initrd_sha256": spec.boot.initrd_sha256,
            "cmdline": spec.boot.cmdline,
        }
    else:
        boot = {"kind": "disk", "disk_sha256": spec.boot.disk_sha256}
    return {
        "name": spec.name,
        "vcpus": spec.vcpus,
        "memory_mib": spec.memory_mib,
        "network": spec.network,
        "arch": spec.arch,
        "boot": boot,
    }


def vmspec_from_dict(data: dict[str, Any]) -> VmSpec:
    """The inverse of `vmspec_to_dict`; VmSpec's own checks run. ValueError when the
    data is not a valid spec (a missing key, an unknown boot kind, a bad value)."""
    try:
        raw_boot = data["boot"]
        kind = raw_boot["kind"]
        boot: KernelBoot | DiskBoot
        if kind == "kernel":
            boot = KernelBoot(
                kernel_sha256=raw_boot["kernel_sha256"],
                initrd_sha256=raw_boot.get("initrd_sha256"),
                cmdline=raw_boot.get("cmdline", "console=ttyS0"),
            )
        elif kind == "disk":
            boot = DiskBoot(disk_sha256=raw_boot["disk_sha256"])
        else:
            raise ValueError(f"boot.kind: {kind!r} is not 'kernel' or 'disk'")
        return VmSpec(
            name=data["name"],
            vcpus=data["vcpus"],
            memory_mib=data["memory_mib"],
            boot=boot,
            network=data.get("network", False),
            arch=data.get("arch", "x86_64"),
        )
    except (KeyError, TypeError) as exc:
        raise ValueError(f"not a VmSpec: {exc!r}") from exc


def vmspec_to_json(spec: VmSpec) -> str:
    # sort_keys + compact separators: one spec always gives the same text.
    return json.dumps(vmspec_to_dict(spec), sort_keys=True, separators=(",", ":"))


def vmspec_from_json(text: str) -> VmSpec:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not a VmSpec: invalid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ValueError("not a VmSpec: JSON is not an object")
    return vmspec_from_dict(data)


# --- rows <-> records -----------------------------------------------------------------


def require_aware(name: str, value: datetime) -> None:
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{name}: naive datetime {value!r}: the store keeps aware UTC times")


def token_from_row(row: Row[Any], uses_left: int | None = None) -> TokenRecord:
    return TokenRecord(
        token_id=row.token_id,
        secret_sha256=row.secret_sha256,
        created_at=row.created_at,
        expires_at=row.expires_at,
        uses_left=row.uses_left if uses_left is None else uses_left,
        note=row.note,
    )


def capacity_values(capacity: Capacity | None) -> dict[str, Any]:
    if capacity is None:
        return {
            "cap_cores": None,
            "cap_memory_mib": None,
            "cap_arch": None,
            "cap_lend_cpu_percent": None,
            "cap_lend_memory_mib": None,
            "cap_lend_until": None,
            "cap_idle": None,
        }
    return {
        "cap_cores": capacity.cores,
        "cap_memory_mib": capacity.memory_mib,
        "cap_arch": capacity.arch,
        "cap_lend_cpu_percent": capacity.lend_cpu_percent,
        "cap_lend_memory_mib": capacity.lend_memory_mib,
        "cap_lend_until": capacity.lend_until,
        "cap_idle": capacity.idle,
    }


def donor_from_row(row: Row[Any]) -> DonorRecord:
    capacity = None
    if row.cap_cores is not None:
        capacity = Capacity(
            cores=row.cap_cores,
            memory_mib=row.cap_memory_mib,
            arch=row.cap_arch,
            lend_cpu_percent=row.cap_lend_cpu_percent,
            lend_memory_mib=row.cap_lend_memory_mib,
            lend_until=row.cap_lend_until,
            idle=bool(row.cap_idle),
        )
    return DonorRecord(
        donor_id=row.donor_id,
        hostname=row.hostname,
        cert_sha256=row.cert_sha256,
        enrolled_at=row.enrolled_at,
        capacity=capacity,
        last_seen=row.last_seen,
        drained=bool(row.drained),
        revoked=bool(row.revoked),
        lost=bool(row.lost),
    )


def checkpoint_values(checkpoint: CheckpointRef | None) -> dict[str, Any]:
    """The checkpoint_* columns of a workload row (all None: no checkpoint).
    ValueError for a checkpoint the store would not give back as it was given."""
    if checkpoint is None:
        return {
            "checkpoint_sha256": None,
            "checkpoint_size": None,
            "checkpoint_epoch": None,
            "checkpoint_at": None,
            "checkpoint_donor_id": None,
        }
    # The columns hold 64 characters: PostgreSQL would refuse more, SQLite would not.
    if not SHA256_PATTERN.fullmatch(checkpoint.sha256):
        raise ValueError(f"checkpoint.sha256: {checkpoint.sha256!r} is not 64 lowercase hex")
    if not 0 < len(checkpoint.donor_id) <= 64:
        raise ValueError(f"checkpoint.donor_id: {checkpoint.donor_id!r} is not 1–64 characters")
    if checkpoint.size < 0 or checkpoint.epoch < 0:
        raise ValueError(f"checkpoint {checkpoint.sha256}: negative size or epoch")
    require_aware("checkpoint.taken_at", checkpoint.taken_at)
    return {
        "checkpoint_sha256": checkpoint.sha256,
        "checkpoint_size": checkpoint.size,
        "checkpoint_epoch": checkpoint.epoch,
        "checkpoint_at": checkpoint.taken_at,
        "checkpoint_donor_id": checkpoint.donor_id,
    }


def checkpoint_from_row(row: Row[Any]) -> CheckpointRef | None:
    if row.checkpoint_sha256 is None:
        return None
    parts = (row.checkpoint_size, row.checkpoint_epoch, row.checkpoint_at, row.checkpoint_donor_id)
    if any(part is None for part in parts):
        # The store writes the five columns together; a partial one was edited by hand.
        raise StoreError(f"workload {row.workload_id}: stored checkpoint is incomplete")
    return CheckpointRef(
        sha256=row.checkpoint_sha256,
        size=row.checkpoint_size,
        epoch=row.checkpoint_epoch,
        taken_at=row.checkpoint_at,
        donor_id=row.checkpoint_donor_id,
    )


def workload_from_row(row: Row[Any]) -> WorkloadRecord:
    try:
        spec = vmspec_from_json(row.spec)
    except ValueError as exc:
        raise StoreError(f"workload {row.workload_id}: stored spec is unreadable: {exc}") from exc
    return WorkloadRecord(
        workload_id=row.workload_id,
        spec=spec,
        priority=row.priority,
        state=WorkloadState(row.state),
        created_at=row.created_at,
        updated_at=row.updated_at,
        donor_id=row.donor_id,
        epoch=row.epoch,
        lease_until=row.lease_until,
        detail=row.detail,
        checkpoint=checkpoint_from_row(row),
    )


def workload_values(workload: WorkloadRecord) -> dict[str, Any]:
    return {
        "workload_id": workload.workload_id,
        "spec": vmspec_to_json(workload.spec),
        "priority": workload.priority,
        "state": workload.state.value,
        "created_at": workload.created_at,
        "updated_at": workload.updated_at,
        "donor_id": workload.donor_id,
        "epoch": workload.epoch,
        "lease_until": workload.lease_until,
        "detail": workload.detail,
        **checkpoint_values(workload.checkpoint),
    }


def event_values(ev: WorkloadEvent) -> dict[str, Any]:
    return {
        "workload_id": ev.workload_id,
        "at": ev.at,
        "kind": ev.kind,
        "donor_id": ev.donor_id,
        "epoch": ev.epoch,
        "detail": ev.detail,
    }


def event_from_row(row: Row[Any]) -> WorkloadEvent:
    return WorkloadEvent(
        workload_id=row.workload_id,
        at=row.at,
        kind=row.kind,
        donor_id=row.donor_id,
        epoch=row.epoch,
        detail=row.detail,
    )


def chunks(items: Sequence[str], size: int) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


HELD_VALUES = sorted(state.value for state in HELD_STATES)
SHA256_PATTERN = re.compile(r"[0-9a-f]{64}")
