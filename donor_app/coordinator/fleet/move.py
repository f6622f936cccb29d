"""Moving a workload between donors: what the coordinator remembers while it happens.

A move starts when a donor reclaims a workload (its owner stayed) or is drained:
- live: the target prepares (PrepareMigration) → the source migrates (Evacuate) → done;
- cold (the target cannot prepare, or the live attempt failed): the source saves and
  uploads a checkpoint (Checkpoint upload) → the target restores it (RunWorkload with
  the checkpoint);
- nowhere (no donor has room): the source saves and uploads, the workload is requeued
  with its checkpoint and placed when a donor has room.

Each attempt gets an epoch of its own (`next_epoch`), written as a "migrate" event
naming the target before the target is told anything. That event is what lets a target
that reports the guest running at that epoch be adopted as its holder even after a
coordinator restart lost the in-memory Move: live migration leaves exactly one running
copy, so a running report at a migrate epoch proves the move happened.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from donor_app.domain import link
from donor_app.domain.records import WorkloadEvent


class Phase(enum.StrEnum):
    PREPARING = "preparing"  # PrepareMigration sent to the target
    MIGRATING = "migrating"  # Evacuate sent to the source
    SAVING = "saving"  # Checkpoint(upload) sent to the source
    PERIODIC = "periodic"  # a periodic checkpoint; the guest stays where it is


@dataclass(slots=True)
class Move:
    workload_id: str
    source: str
    source_epoch: int
    target: str | None  # None: nowhere to go (checkpoint, then requeue)
    target_epoch: int
    phase: Phase
    started: datetime
    deadline: datetime
    reason: str
    live_error: str = ""  # why the live attempt failed, if it did

    @property
    def live(self) -> bool:
        return self.phase in (Phase.PREPARING, Phase.MIGRATING)


MIGRATE_EVENT = "migrate"


def next_epoch(current: int, events: Iterable[WorkloadEvent]) -> int:
    """An epoch no assignment or move attempt of this workload has used."""
    return max([current, *(e.epoch for e in events)]) + 1


def arrived_by_migration(
    donor_id: str, reported: link.GuestReport, current_epoch: int, events: Iterable[WorkloadEvent]
) -> bool:
    """Whether `donor_id` reporting this guest proves a live move to it completed: it runs
    the guest at an epoch newer than the workload's, which a migrate event gave it."""
    return (
        reported.state in (link.GuestState.RUNNING, link.GuestState.PAUSED)
        and reported.epoch > current_epoch
        and any(
            e.kind == MIGRATE_EVENT and e.donor_id == donor_id and e.epoch == reported.epoch
            for e in events
        )
    )
