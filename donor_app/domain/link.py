"""The donor ↔ coordinator conversation in domain terms (wire form: coordinator.proto).

The agent's link and the coordinator's fleet logic speak these; `donor_app.proto.
coordinator_serde` is the only place that converts them to and from protobuf, and it
validates every field on the way in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from donor_app.domain.decision import Level
from donor_app.domain.guest import GuestState
from donor_app.domain.vm import VmSpec

# GuestState is the domain's (domain.guest); it is named here too, as GuestReport's type.
__all__ = [
    "MAX_GUESTS_PER_REPORT",
    "MAX_TEXT",
    "Ack",
    "Capacity",
    "Checkpoint",
    "CheckpointInfo",
    "Command",
    "CommandResult",
    "CoordinatorMessage",
    "DonorEvent",
    "DonorMessage",
    "Evacuate",
    "GuestReport",
    "GuestState",
    "Hello",
    "MigrationLimits",
    "MigrationReport",
    "MigrationTarget",
    "PrepareMigration",
    "Reclaim",
    "Report",
    "RunWorkload",
    "StopWorkload",
    "Welcome",
]

MAX_GUESTS_PER_REPORT = 256
MAX_TEXT = 512  # detail/reason strings from the other side are cut to this


@dataclass(frozen=True, slots=True)
class Capacity:
    """A donor's hardware and what its owner's policy lets it lend now."""

    cores: int
    memory_mib: int
    arch: str
    lend_cpu_percent: float = 0.0  # of the whole host
    lend_memory_mib: int = 0
    lend_until: datetime | None = None  # None: no end expected
    idle: bool = False


@dataclass(frozen=True, slots=True)
class CheckpointInfo:
    """A guest's saved state kept by the coordinator: taken on `donor_id` at `epoch`."""

    sha256: str
    size: int
    epoch: int
    taken_at: datetime
    donor_id: str = ""


@dataclass(frozen=True, slots=True)
class MigrationTarget:
    """Where a live-migrating guest goes: the target's libvirt as the source reaches it,
    where the migration stream connects, and the target's own paths for the guest."""

    libvirt_uri: str
    migrate_uri: str
    kernel_path: str
    initrd_path: str
    console_path: str


@dataclass(frozen=True, slots=True)
class MigrationLimits:
    bandwidth_mibps: int = 0  # 0: unlimited
    max_downtime_ms: int = 50
    deadline_s: int = 60
    tls: bool = False


@dataclass(frozen=True, slots=True)
class MigrationReport:
    seconds: float
    downtime_ms: float = 0.0  # as QEMU reports it; 0 when unknown


@dataclass(frozen=True, slots=True)
class GuestReport:
    workload_id: str
    epoch: int
    state: GuestState
    detail: str = ""


# --- donor → coordinator -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Hello:
    agent_version: str
    capacity: Capacity
    guests: tuple[GuestReport, ...] = ()


@dataclass(frozen=True, slots=True)
class Report:
    """What the donor has and does now; `level` is its policy's rung, None before the
    first decision."""

    capacity: Capacity
    guests: tuple[GuestReport, ...] = ()
    level: Level | None = None


@dataclass(frozen=True, slots=True)
class Reclaim:
    workload_ids: tuple[str, ...]
    reason: str


@dataclass(frozen=True, slots=True)
class CommandResult:
    command_seq: int
    ok: bool
    error: str = ""
    prepared: MigrationTarget | None = None  # answer to PrepareMigration
    checkpoint: CheckpointInfo | None = None  # answer to Checkpoint(upload=True)
    migration: MigrationReport | None = None  # answer to a successful Evacuate


DonorMessage = Hello | Report | Reclaim | CommandResult


@dataclass(frozen=True, slots=True)
class DonorEvent:
    seq: int
    message: DonorMessage


# --- coordinator → donor -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Welcome:
    donor_id: str
    lease_ttl_s: int
    report_interval_s: int


@dataclass(frozen=True, slots=True)
class Ack:
    event_seq: int
    lease_until: datetime


@dataclass(frozen=True, slots=True)
class RunWorkload:
    workload_id: str
    epoch: int
    spec: VmSpec
    priority: int = 0
    checkpoint: CheckpointInfo | None = None  # restore from it instead of booting


@dataclass(frozen=True, slots=True)
class StopWorkload:
    workload_id: str
    epoch: int
    reason: str


@dataclass(frozen=True, slots=True)
class Evacuate:
    """Live-migrate to a target that prepared for it (see PrepareMigration)."""

    workload_id: str
    epoch: int
    target_donor_id: str
    target: MigrationTarget | None = None
    target_epoch: int = 0
    limits: MigrationLimits = MigrationLimits()


@dataclass(frozen=True, slots=True)
class PrepareMigration:
    """To the target of a live migration: get ready to receive the workload at `epoch`."""

    workload_id: str
    epoch: int
    spec: VmSpec
    source_donor_id: str


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """Save the guest to disk; `upload` also sends it to the coordinator; `keep_running`
    (a periodic checkpoint) lets it go on running here afterwards."""

    workload_id: str
    epoch: int
    upload: bool = False
    keep_running: bool = False


CoordinatorMessage = (
    Welcome | Ack | RunWorkload | StopWorkload | Evacuate | Checkpoint | PrepareMigration
)


@dataclass(frozen=True, slots=True)
class Command:
    seq: int
    message: CoordinatorMessage
    sent_at: datetime | None = field(default=None, compare=False)
