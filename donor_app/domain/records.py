"""The coordinator's records: what the store keeps and the fleet logic reasons about.

Plain frozen dataclasses, no SQLAlchemy or protobuf types: the store converts rows to
these, `donor_app.proto.coordinator_serde` converts them to wire messages. Times are aware UTC
datetimes.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime
from typing import TypeAlias

from donor_app.domain.link import Capacity, CheckpointInfo
from donor_app.domain.vm import VmSpec

__all__ = [
    "HELD_STATES",
    "Capacity",
    "CheckpointRef",
    "DonorRecord",
    "DonorSeen",
    "IdleSample",
    "ImageRecord",
    "LeaseRenewal",
    "TokenRecord",
    "WorkloadEvent",
    "WorkloadRecord",
    "WorkloadState",
]


class WorkloadState(enum.StrEnum):
    """Where a workload is in its life. Stored by value: never rename a member."""

    QUEUED = "queued"  # waiting for a donor (new, requeued after a lost donor, evacuated)
    ASSIGNED = "assigned"  # RunWorkload sent, not yet reported running
    RUNNING = "running"
    PAUSED = "paused"  # on its donor, suspended for the owner
    EVACUATING = "evacuating"  # an Evacuate was sent; waiting for the donor's answer
    CHECKPOINTED = "checkpointed"  # saved on its donor's disk
    CANCELLED = "cancelled"
    FAILED = "failed"


# States in which a workload is bound to a donor by a lease.
HELD_STATES = frozenset(
    {
        WorkloadState.ASSIGNED,
        WorkloadState.RUNNING,
        WorkloadState.PAUSED,
        WorkloadState.EVACUATING,
        WorkloadState.CHECKPOINTED,
    }
)
FINAL_STATES = frozenset({WorkloadState.CANCELLED, WorkloadState.FAILED})


@dataclass(frozen=True, slots=True)
class TokenRecord:
    """An enrollment token. Only the sha256 of the secret is stored."""

    token_id: str
    secret_sha256: str
    created_at: datetime
    expires_at: datetime
    uses_left: int
    note: str = ""


@dataclass(frozen=True, slots=True)
class DonorRecord:
    """An enrolled donor. `cert_sha256` is the fingerprint of its current certificate."""

    donor_id: str
    hostname: str
    cert_sha256: str
    enrolled_at: datetime
    capacity: Capacity | None = None
    last_seen: datetime | None = None
    drained: bool = False
    revoked: bool = False
    lost: bool = False


# The latest saved state of a workload, taken on `donor_id` at `epoch`; the bytes live
# in the coordinator's checkpoint file store under `sha256`, and a workload whose donor
# is lost restarts elsewhere from them. `donor_id` names the donor as it was (it may
# since be revoked or removed). The link's own type, as with Capacity: the fleet hands
# a stored checkpoint to the next donor (RunWorkload.checkpoint) without converting it.
# The store refuses an empty `donor_id`.
CheckpointRef: TypeAlias = CheckpointInfo


@dataclass(frozen=True, slots=True)
class WorkloadRecord:
    """A workload and its assignment. `epoch` grows by one at every (re)assignment; the
    lease binds (donor_id, epoch) until `lease_until`. `checkpoint` is its latest saved
    state, if any (kept across reassignments until replaced or cleared)."""

    workload_id: str
    spec: VmSpec
    priority: int
    state: WorkloadState
    created_at: datetime
    updated_at: datetime
    donor_id: str | None = None
    epoch: int = 0
    lease_until: datetime | None = None
    detail: str = ""
    checkpoint: CheckpointRef | None = None


@dataclass(frozen=True, slots=True)
class ImageRecord:
    sha256: str
    size: int
    added_at: datetime


@dataclass(frozen=True, slots=True)
class WorkloadEvent:
    """One line of a workload's history (placed, moved, checkpointed, requeued...)."""

    workload_id: str
    at: datetime
    kind: str
    donor_id: str | None = None
    epoch: int = 0
    detail: str = ""


@dataclass(frozen=True, slots=True)
class LeaseRenewal:
    """A donor reported holding a workload at an epoch: extend its lease."""

    workload_id: str
    donor_id: str
    epoch: int
    lease_until: datetime


@dataclass(frozen=True, slots=True)
class DonorSeen:
    """A donor's latest report, written in batches (not one commit per report)."""

    donor_id: str
    last_seen: datetime
    capacity: Capacity


@dataclass(frozen=True, slots=True)
class IdleSample:
    """Seconds a donor was seen, and seen idle, in one hour of the week (0 = Monday
    00:00–01:00 UTC ... 167)."""

    donor_id: str
    hour_of_week: int
    seen_seconds: float
    idle_seconds: float
