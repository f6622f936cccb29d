"""The fleet: donors' sessions, workloads, leases, placement and moves. No gRPC here.

`Fleet` is a thin façade over one module per job, each working on one shared
`FleetState`; the arrows run only downward in this list (checked by the layering
contracts in `.importlinter`):

    __init__     Fleet: builds the parts, runs the background tasks, the public API
    admin        submit, cancel, move, drain, revoke; listings and history
    sessions     who may connect; one session per donor; dispatch of a donor's events
    reports      the hot path: a report answered with an Ack; batched writes (flush)
    fencing      a guest reported at an epoch its donor does not hold
    moves        live and cold moves, their deadlines, periodic checkpoints
    leases       expired leases requeued; silent donors marked lost
    checkpoints  who may upload or download a workload's checkpoint
    placement    offers from connected donors; queued workloads assigned
    state        the shared state; compare-and-set writes; epochs; requeue
    config, move, session   settings, a move's record, a donor's stream (no fleet imports)

Everything runs on one asyncio loop. The hot path, a donor's Report, only touches memory
and answers at once with an Ack; what must be kept (last seen, renewed leases, idle
history) is written to the store in batches once a second, off the loop in a worker
thread. Decisions that change a workload (placement, reclaim, lease expiry, admin
commands) take one lock and write through the store before memory, so a crash loses
nothing the donors were told.

Leases and fencing (docs/design.md): each assignment has an epoch; the donor's reports
renew the lease of what it holds at that epoch. A workload whose lease ends is requeued
and its next assignment gets a newer epoch (restoring from its latest checkpoint, if it
has one); a donor that later reports the old epoch is told to stop its copy. A donor
reporting a workload it was never given is refused outright.

The store and the clock are injected, and so is the way store calls leave the loop
(`io`): unit tests run the rules on an in-memory store and a fake clock, inline.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta

from donor_app.coordinator.fleet.admin import Admin
from donor_app.coordinator.fleet.checkpoints import Checkpoints
from donor_app.coordinator.fleet.config import Clock, FleetConfig, new_id, utc_now
from donor_app.coordinator.fleet.fencing import Fencing
from donor_app.coordinator.fleet.leases import Leases
from donor_app.coordinator.fleet.moves import Moves
from donor_app.coordinator.fleet.placement import Placement
from donor_app.coordinator.fleet.reports import Reports
from donor_app.coordinator.fleet.session import Code, DonorSession, Refused
from donor_app.coordinator.fleet.sessions import Sessions
from donor_app.coordinator.fleet.state import FleetState, IoRunner
from donor_app.coordinator.images import ImageStore
from donor_app.coordinator.store.ports import Store
from donor_app.domain import link
from donor_app.domain.records import DonorRecord, WorkloadEvent, WorkloadRecord, WorkloadState
from donor_app.domain.vm import VmSpec

__all__ = ["Clock", "Fleet", "FleetConfig", "new_id", "utc_now"]

log = logging.getLogger(__name__)


class Fleet:
    """The coordinator's fleet logic behind one object: the servicers, the enrollment and
    the server call only this. Construct, `await start()` on the serving loop, and
    `await stop()` before the loop ends."""

    def __init__(
        self,
        store: Store,
        images: ImageStore,
        config: FleetConfig | None = None,
        clock: Clock = utc_now,
        checkpoints: ImageStore | None = None,
        *,
        io: IoRunner | None = None,
    ) -> None:
        self._state = state = FleetState(
            store,
            images,
            config or FleetConfig(),
            clock,
            checkpoints or ImageStore(images.root / "checkpoints"),
            io=io,
        )
        self._placement = Placement(state)
        self._moves = Moves(state, self._placement)
        self._fencing = Fencing(state, self._moves)
        self._reports = Reports(state, self._fencing)
        self._sessions = Sessions(state, self._reports, self._moves)
        self._leases = Leases(state)
        self._checkpoints = Checkpoints(state)
        self._admin = Admin(state, self._moves)
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def store(self) -> Store:
        return self._state.store

    @property
    def images(self) -> ImageStore:
        return self._state.images

    @property
    def checkpoints(self) -> ImageStore:
        return self._state.checkpoints

    @property
    def config(self) -> FleetConfig:
        return self._state.config

    # --- life cycle -----------------------------------------------------------------------

    async def load(self) -> None:
        """Read the fleet's state from the store (part of `start`)."""
        await self._state.load()
        log.info(
            "fleet loaded: %d donors, %d active workloads",
            len(self._state.donors),
            len(self._state.workloads),
        )

    async def start(self) -> None:
        """Load the state, then run the flush, placement and sweep tasks on this loop."""
        await self.load()
        self._tasks = [
            asyncio.create_task(self._every(self.config.flush_interval, self.flush)),
            asyncio.create_task(self._placement_loop()),
            asyncio.create_task(self._every(timedelta(seconds=1), self.sweep)),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        for session in list(self._state.sessions.values()):
            session.close(Refused(Code.ABORTED, "the coordinator is shutting down"))
        await self.flush()

    async def settle(self) -> None:
        """Wait for the background tasks reports started (fences, state changes)."""
        await self._state.settle()

    async def _every(self, interval: timedelta, step: Callable[[], Awaitable[None]]) -> None:
        while True:
            await asyncio.sleep(interval.total_seconds())
            try:
                await step()
            except Exception:
                # A failing store must not kill the loop: the next round retries.
                log.exception("fleet background step %s failed", step.__name__)

    async def _placement_loop(self) -> None:
        interval = self.config.placement_interval.total_seconds()
        wake = self._state.wake_placement
        while True:
            # Not asyncio.wait_for: before Python 3.12 it can swallow a cancellation
            # that races with the event being set, and stop() would wait forever.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):
                    await wake.wait()
            wake.clear()
            try:
                await self.place_queued()
            except Exception:
                log.exception("placement failed")

    # --- the background steps (also called directly by tests) ----------------------------

    async def flush(self) -> None:
        """Write the batched reports: last seen, leases, idle history."""
        await self._reports.flush()

    async def place_queued(self) -> int:
        """Assign queued workloads to donors with room; returns how many were placed."""
        return await self._placement.place_queued()

    async def sweep(self) -> None:
        """Periodic checkpoints; then, past the start-up grace, moves past their deadline,
        expired leases and silent donors."""
        now = self._state.clock()
        self._moves.ask_periodic_checkpoints(now)
        if now < self._state.grace_until:
            return
        await self._moves.sweep(now)
        await self._leases.requeue_expired(now)
        await self._leases.mark_lost(now)

    # --- views ----------------------------------------------------------------------------

    def now(self) -> datetime:
        return self._state.clock()

    @property
    def connected_donors(self) -> int:
        return len(self._state.sessions)

    def is_connected(self, donor_id: str) -> bool:
        return donor_id in self._state.sessions

    def workload_counts(self) -> dict[WorkloadState, int]:
        counts = dict.fromkeys(WorkloadState, 0)
        for record in self._state.workloads.values():
            counts[record.state] += 1
        return counts

    def workload(self, workload_id: str) -> WorkloadRecord | None:
        return self._state.workloads.get(workload_id)

    def held_by(self, donor_id: str) -> list[WorkloadRecord]:
        return self._state.held_by(donor_id)

    def donor_workload_ids(self) -> dict[str, list[str]]:
        return self._admin.donor_workload_ids()

    # --- donors' sessions ------------------------------------------------------------------

    async def check_donor(self, donor_id: str, cert_sha256: str) -> DonorRecord:
        return await self._sessions.check_donor(donor_id, cert_sha256)

    async def open_session(self, donor_id: str, cert_sha256: str) -> DonorSession:
        return await self._sessions.open_session(donor_id, cert_sha256)

    def close_session(self, session: DonorSession) -> None:
        self._sessions.close_session(session)

    async def on_event(self, session: DonorSession, event: link.DonorEvent) -> None:
        await self._sessions.on_event(session, event)

    # --- checkpoints -----------------------------------------------------------------------

    def holder_check(self, donor_id: str, workload_id: str, epoch: int) -> WorkloadRecord:
        return self._checkpoints.holder_check(donor_id, workload_id, epoch)

    async def accept_checkpoint(
        self, donor_id: str, workload_id: str, epoch: int, sha256: str, size: int
    ) -> link.CheckpointInfo:
        return await self._checkpoints.accept_checkpoint(donor_id, workload_id, epoch, sha256, size)

    def checkpoint_to_pull(
        self, donor_id: str, workload_id: str, epoch: int, sha256: str
    ) -> link.CheckpointInfo:
        return self._checkpoints.checkpoint_to_pull(donor_id, workload_id, epoch, sha256)

    # --- admin -----------------------------------------------------------------------------

    async def add_donor(self, donor: DonorRecord) -> None:
        await self._admin.add_donor(donor)

    async def add_image(self, sha256: str, size: int) -> None:
        await self._admin.add_image(sha256, size)

    async def submit(self, spec: VmSpec, priority: int) -> WorkloadRecord:
        return await self._admin.submit(spec, priority)

    async def list_workloads(self) -> list[WorkloadRecord]:
        return await self._admin.list_workloads()

    async def list_donors(self) -> list[DonorRecord]:
        return await self._admin.list_donors()

    async def history(self, workload_id: str) -> tuple[WorkloadRecord, list[WorkloadEvent]]:
        return await self._admin.history(workload_id)

    async def cancel(self, workload_id: str) -> WorkloadRecord:
        return await self._admin.cancel(workload_id)

    async def move(
        self, workload_id: str, target: str | None = None, cold: bool = False
    ) -> WorkloadRecord:
        return await self._admin.move(workload_id, target, cold)

    async def drain(self, donor_id: str) -> DonorRecord:
        return await self._admin.drain(donor_id)

    async def revoke(self, donor_id: str) -> DonorRecord:
        return await self._admin.revoke(donor_id)
