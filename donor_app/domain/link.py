"""The donor ↔ coordinator conversation in domain terms (wire form: coordinator.proto).

The agent's link and the coordinator's fleet logic speak these; `donor_app.proto.
coordinator_serde` is the only place that converts them to and from protobuf, and it
validates every field on the way in.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime

from donor_app.domain.vm import VmSpec

MAX_GUESTS_PER_REPORT = 256
MAX_TEXT = 512  # detail/reason strings from the other side are cut to this


class GuestState(enum.StrEnum):
    STARTING = "starting"
    RUNNING = "running"
    PAUSED = "paused"
    CHECKPOINTED = "checkpointed"
    STOPPED = "stopped"
    FAILED = "failed"


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
    capacity: Capacity
    guests: tuple[GuestReport, ...] = ()
    level: str = ""


@dataclass(frozen=True, slots=True)
class Reclaim:
    workload_ids: tuple[str, ...]
    reason: str


@dataclass(frozen=True, slots=True)
class CommandResult:
    command_seq: int
    ok: bool
    error: str = ""


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


@dataclass(frozen=True, slots=True)
class StopWorkload:
    workload_id: str
    epoch: int
    reason: str


@dataclass(frozen=True, slots=True)
class Evacuate:
    workload_id: str
    epoch: int
    target_donor_id: str


@dataclass(frozen=True, slots=True)
class Checkpoint:
    workload_id: str
    epoch: int


CoordinatorMessage = Welcome | Ack | RunWorkload | StopWorkload | Evacuate | Checkpoint


@dataclass(frozen=True, slots=True)
class Command:
    seq: int
    message: CoordinatorMessage
    sent_at: datetime | None = field(default=None, compare=False)
