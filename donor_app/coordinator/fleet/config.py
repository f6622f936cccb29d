"""The fleet's settings and the small shared vocabulary of its modules (clock, ids, how a
donor's report maps onto a workload's state). Imports nothing else of the fleet package."""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from donor_app.domain import link
from donor_app.domain.decision import Level
from donor_app.domain.records import WorkloadRecord, WorkloadState

Clock = Callable[[], datetime]


def utc_now() -> datetime:
    return datetime.now(UTC)


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(8)}"


@dataclass(frozen=True, slots=True)
class FleetConfig:
    lease_ttl: timedelta = timedelta(seconds=30)
    report_interval: timedelta = timedelta(seconds=5)
    flush_interval: timedelta = timedelta(seconds=1)
    placement_interval: timedelta = timedelta(seconds=1)
    # Live migration: bandwidth cap, downtime, and the deadline after which the source
    # aborts (the guest stays there) and the move goes cold.
    migration: link.MigrationLimits = field(default_factory=link.MigrationLimits)
    # How long a cold move (save, upload, restore) may take before it is given up.
    cold_move_deadline: timedelta = timedelta(minutes=5)
    # Running workloads are checkpointed this often (None: never), so a lost donor's
    # workload restarts elsewhere from a recent state.
    checkpoint_interval: timedelta | None = timedelta(minutes=15)


# What a donor's reported guest state means for the workload.
REPORTED = {
    link.GuestState.STARTING: WorkloadState.ASSIGNED,
    link.GuestState.RUNNING: WorkloadState.RUNNING,
    link.GuestState.PAUSED: WorkloadState.PAUSED,
    link.GuestState.CHECKPOINTED: WorkloadState.CHECKPOINTED,
}

# Policy levels at which a donor asks for its guests to be moved away (Report.level).
RECLAIMING_LEVELS = frozenset({Level.EVACUATE, Level.CHECKPOINT})


def run_command(record: WorkloadRecord) -> link.RunWorkload:
    """The command that starts (or restores) `record` on its donor at its epoch."""
    return link.RunWorkload(
        record.workload_id, record.epoch, record.spec, record.priority, record.checkpoint
    )


def newer_copy_of_evacuating(record: WorkloadRecord | None, guest: link.GuestReport) -> bool:
    """A copy at an epoch above an evacuating workload's: a move's target, perhaps of a
    move a restart lost — the move (or the sweep after it) decides, not a fence."""
    return (
        record is not None
        and record.state is WorkloadState.EVACUATING
        and guest.epoch > record.epoch
    )
