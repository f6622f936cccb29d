"""The fleet's shared state and its one way of changing a workload: compare-and-set
through the store, then memory.

Everything here runs on the coordinator's asyncio loop (one thread); store calls go to a
worker thread through `io` (injectable, so unit tests run them inline). Every other
module of the fleet package works on one `FleetState`; none of them keeps a second copy
of a workload or a session.

What lives where:
- `workloads`: every workload not final, as last written to the store (the store is the
  truth across restarts; this is its cache, updated only by `write`).
- `sessions`: the donors connected now, one open Connect stream each.
- `moves`: the moves under way (lost on a restart; the store's events let the fleet
  recognise a finished one afterwards, see move.py).
- `lock`: held by every decision that changes a workload (placement, moves, lease
  expiry, admin commands), so two decisions never act on one workload at once. The report
  hot path does not take it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any, Protocol, TypeVar

from donor_app.coordinator.fleet.config import Clock, FleetConfig
from donor_app.coordinator.fleet.move import Move, next_epoch
from donor_app.coordinator.fleet.session import DonorSession
from donor_app.coordinator.images import ImageStore
from donor_app.coordinator.store.ports import Conflict, Store
from donor_app.domain.placement import Demand
from donor_app.domain.records import (
    FINAL_STATES,
    HELD_STATES,
    DonorRecord,
    WorkloadEvent,
    WorkloadRecord,
    WorkloadState,
)

log = logging.getLogger(__name__)

_T = TypeVar("_T")


class IoRunner(Protocol):
    """Runs a blocking store call without blocking the loop (default: a worker thread)."""

    def __call__(self, func: Callable[..., _T], /, *args: Any, **kwargs: Any) -> Awaitable[_T]: ...


def demand(record: WorkloadRecord) -> Demand:
    """What a workload asks of a donor, for placement."""
    return Demand(
        workload_id=record.workload_id,
        vcpus=record.spec.vcpus,
        memory_mib=record.spec.memory_mib,
        arch=record.spec.arch,
        priority=record.priority,
    )


class FleetState:
    def __init__(
        self,
        store: Store,
        images: ImageStore,
        config: FleetConfig,
        clock: Clock,
        checkpoints: ImageStore,
        *,
        io: IoRunner | None = None,
    ) -> None:
        self.store = store
        self.images = images
        # Checkpoints are guest memory: kept apart from images and served only to the
        # donor a workload is assigned to (PullCheckpoint checks).
        self.checkpoints = checkpoints
        self.config = config
        self.clock = clock
        self.io: IoRunner = io or asyncio.to_thread
        self.sessions: dict[str, DonorSession] = {}
        self.workloads: dict[str, WorkloadRecord] = {}  # every workload not final
        self.donors: dict[str, DonorRecord] = {}
        self.lock = asyncio.Lock()
        self.moves: dict[str, Move] = {}
        self.wake_placement = asyncio.Event()
        # The newest epoch any assignment or move attempt used, per workload: a new one
        # is always above it (so two attempts never share an epoch). Read from the
        # workload's events the first time it is needed (`next_epoch`).
        self.epoch_floor: dict[str, int] = {}
        # Periodic checkpoints: when each (workload, epoch) was first seen running.
        self.running_since: dict[tuple[str, int], datetime] = {}
        # After a restart, donors need a moment to reconnect and renew: no lease
        # expires before one TTL has passed since start (`load`).
        self.grace_until = clock()
        self._background: set[asyncio.Task[None]] = set()

    async def load(self) -> None:
        """Read the donors and every workload not final from the store (start-up)."""
        now = self.clock()
        self.grace_until = now + self.config.lease_ttl
        donors = await self.io(self.store.list_donors)
        self.donors = {d.donor_id: d for d in donors}
        active = [s for s in WorkloadState if s not in FINAL_STATES]
        for record in await self.io(self.store.list_workloads, active):
            self.workloads[record.workload_id] = record

    # --- tasks ------------------------------------------------------------------------

    def spawn(self, coroutine: Awaitable[None]) -> None:
        """Run `coroutine` in the background (a fence, a state change noted from a
        report): the report that caused it is answered at once."""

        async def run() -> None:
            try:
                await coroutine
            except Exception:
                log.exception("fleet task failed")

        task = asyncio.create_task(run())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def settle(self) -> None:
        """Wait until the background tasks (and those they spawn) are done."""
        while self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)

    # --- views ------------------------------------------------------------------------

    def held_by(self, donor_id: str) -> list[WorkloadRecord]:
        return [
            w for w in self.workloads.values() if w.donor_id == donor_id and w.state in HELD_STATES
        ]

    # --- changing a workload -------------------------------------------------------------

    async def write(self, record: WorkloadRecord, **changes: object) -> WorkloadRecord | None:
        """Compare-and-set through the store, then memory. None if the epoch moved on."""
        try:
            updated = await self.io(
                self.store.update_workload,
                record.workload_id,
                expected_epoch=record.epoch,
                now=self.clock(),
                **changes,
            )
        except Conflict:
            log.warning("workload %s changed under us; not updated", record.workload_id)
            return None
        if updated.state in FINAL_STATES:
            self.workloads.pop(updated.workload_id, None)
        else:
            self.workloads[updated.workload_id] = updated
        return updated

    async def next_epoch(self, record: WorkloadRecord) -> int:
        """An epoch no assignment or move attempt of `record` has used."""
        floor = self.epoch_floor.get(record.workload_id)
        if floor is None:
            events = await self.io(self.store.workload_events, record.workload_id)
            floor = next_epoch(record.epoch, events) - 1
        epoch = max(floor, record.epoch) + 1
        self.epoch_floor[record.workload_id] = epoch
        return epoch

    async def requeue(self, record: WorkloadRecord, reason: str) -> None:
        """Under the lock: back to the queue (its checkpoint, if any, kept), to be placed
        at a newer epoch."""
        updated = await self.write(
            record,
            event=WorkloadEvent(
                record.workload_id, self.clock(), "requeued", record.donor_id, record.epoch, reason
            ),
            state=WorkloadState.QUEUED,
            clear_donor=True,
            detail=reason,
        )
        if updated is not None:
            log.info("requeued %s: %s", record.workload_id, reason)
            self.wake_placement.set()
