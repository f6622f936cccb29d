"""The fleet: donors' sessions, workloads, leases, placement. No gRPC here.

Runs on one asyncio loop. The hot path — a donor's Report — only touches memory and
answers at once with an Ack; what must be kept (last seen, renewed leases, idle history)
is written to the store in batches once a second, off the loop in a worker thread.
Decisions that change a workload (placement, reclaim, lease expiry, admin commands)
take one lock and write through the store before memory, so a crash loses nothing the
donors were told.

Leases and fencing (DESIGN.md): each assignment has an epoch; the donor's reports renew
the lease of what it holds at that epoch. A workload whose lease ends is requeued and
its next assignment gets a newer epoch (restoring from its latest checkpoint, if it has
one); a donor that later reports the old epoch is told to stop its copy. A donor
reporting a workload it was never given is refused outright.

Moves between donors (live, cold, or to nowhere) are described in moves.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import TypeVar

from donor_app.coordinator.images import ImageStore
from donor_app.coordinator.moves import (
    MIGRATE_EVENT,
    Move,
    Phase,
    arrived_by_migration,
    next_epoch,
)
from donor_app.coordinator.session import Code, DonorSession, Refused
from donor_app.coordinator.store.ports import Conflict, Store
from donor_app.domain import link
from donor_app.domain.placement import (
    Demand,
    Offer,
    evacuation_target,
    hour_of_week,
    offer_from_capacity,
    place,
)
from donor_app.domain.records import (
    FINAL_STATES,
    HELD_STATES,
    DonorRecord,
    DonorSeen,
    IdleSample,
    ImageRecord,
    LeaseRenewal,
    WorkloadEvent,
    WorkloadRecord,
    WorkloadState,
)
from donor_app.domain.vm import VmSpec

log = logging.getLogger(__name__)

_T = TypeVar("_T")
Clock = Callable[[], datetime]

# What a donor's reported guest state means for the workload.
_REPORTED = {
    link.GuestState.STARTING: WorkloadState.ASSIGNED,
    link.GuestState.RUNNING: WorkloadState.RUNNING,
    link.GuestState.PAUSED: WorkloadState.PAUSED,
    link.GuestState.CHECKPOINTED: WorkloadState.CHECKPOINTED,
}


def _newer_copy_of_evacuating(record: WorkloadRecord | None, guest: link.GuestReport) -> bool:
    """A copy at an epoch above an evacuating workload's: a move's target, perhaps of a
    move a restart lost — the move (or the sweep after it) decides, not a fence."""
    return (
        record is not None
        and record.state is WorkloadState.EVACUATING
        and guest.epoch > record.epoch
    )


# Policy levels at which a donor asks for its guests to be moved away (Report.level).
RECLAIMING_LEVELS = frozenset({"evacuate", "checkpoint"})


def utc_now() -> datetime:
    return datetime.now(UTC)


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


def _demand(record: WorkloadRecord) -> Demand:
    return Demand(
        workload_id=record.workload_id,
        vcpus=record.spec.vcpus,
        memory_mib=record.spec.memory_mib,
        arch=record.spec.arch,
        priority=record.priority,
    )


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(8)}"


class Fleet:
    def __init__(
        self,
        store: Store,
        images: ImageStore,
        config: FleetConfig | None = None,
        clock: Clock = utc_now,
        checkpoints: ImageStore | None = None,
    ) -> None:
        self.store = store
        self.images = images
        # Checkpoints are guest memory: kept apart from images and served only to the
        # donor a workload is assigned to (PullCheckpoint checks).
        self.checkpoints = checkpoints or ImageStore(images.root / "checkpoints")
        self.config = config or FleetConfig()
        self._clock = clock
        self._sessions: dict[str, DonorSession] = {}
        self._workloads: dict[str, WorkloadRecord] = {}  # every workload not final
        self._donors: dict[str, DonorRecord] = {}
        self._lock = asyncio.Lock()
        self._seen: dict[str, DonorSeen] = {}
        self._renewals: dict[str, LeaseRenewal] = {}
        self._idle: dict[tuple[str, int], list[float]] = {}
        self._idle_ratios: dict[str, float] = {}
        self._idle_ratios_hour = -1
        self._wake_placement = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._background: set[asyncio.Task[None]] = set()
        self._moves: dict[str, Move] = {}
        # The newest epoch any assignment or move attempt used, per workload: a new one
        # is always above it (so two attempts never share an epoch). Read from the
        # workload's events the first time it is needed (`_next_epoch`).
        self._epoch_floor: dict[str, int] = {}
        # Periodic checkpoints: when each (workload, epoch) was first seen running.
        self._running_since: dict[tuple[str, int], datetime] = {}
        # After a restart, donors need a moment to reconnect and renew: no lease
        # expires before one TTL has passed since start.
        self._grace_until = self._clock()

    # --- life cycle -----------------------------------------------------------------------

    async def _io(self, func: Callable[..., _T], *args: object, **kwargs: object) -> _T:
        return await asyncio.to_thread(func, *args, **kwargs)

    async def start(self) -> None:
        now = self._clock()
        self._grace_until = now + self.config.lease_ttl
        donors = await self._io(self.store.list_donors)
        self._donors = {d.donor_id: d for d in donors}
        active = [s for s in WorkloadState if s not in FINAL_STATES]
        for record in await self._io(self.store.list_workloads, active):
            self._workloads[record.workload_id] = record
        self._tasks = [
            asyncio.create_task(self._every(self.config.flush_interval, self.flush)),
            asyncio.create_task(self._placement_loop()),
            asyncio.create_task(self._every(timedelta(seconds=1), self.sweep)),
        ]
        log.info("fleet started: %d donors, %d active workloads", len(donors), len(self._workloads))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        for session in list(self._sessions.values()):
            session.close(Refused(Code.ABORTED, "the coordinator is shutting down"))
        await self.flush()

    async def _every(self, interval: timedelta, step: Callable[[], Awaitable[None]]) -> None:
        while True:
            await asyncio.sleep(interval.total_seconds())
            try:
                await step()
            except Exception:
                # A failing store must not kill the loop: the next round retries.
                log.exception("fleet background step %s failed", step.__name__)

    def _spawn(self, coroutine: Awaitable[None]) -> None:
        async def run() -> None:
            try:
                await coroutine
            except Exception:
                log.exception("fleet task failed")

        task = asyncio.create_task(run())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # --- views ----------------------------------------------------------------------------

    def now(self) -> datetime:
        return self._clock()

    @property
    def connected_donors(self) -> int:
        return len(self._sessions)

    def is_connected(self, donor_id: str) -> bool:
        return donor_id in self._sessions

    def workload_counts(self) -> dict[WorkloadState, int]:
        counts = dict.fromkeys(WorkloadState, 0)
        for record in self._workloads.values():
            counts[record.state] += 1
        return counts

    def workload(self, workload_id: str) -> WorkloadRecord | None:
        return self._workloads.get(workload_id)

    def held_by(self, donor_id: str) -> list[WorkloadRecord]:
        return [
            w for w in self._workloads.values() if w.donor_id == donor_id and w.state in HELD_STATES
        ]

    # --- sessions -------------------------------------------------------------------------

    async def check_donor(self, donor_id: str, cert_sha256: str) -> DonorRecord:
        """The enrolled, unrevoked donor holding this certificate, or Refused."""
        donor = await self._io(self.store.get_donor, donor_id)
        if donor is None:
            raise Refused(Code.UNAUTHENTICATED, f"donor {donor_id} is not enrolled here")
        if donor.revoked:
            raise Refused(Code.PERMISSION_DENIED, f"donor {donor_id} was revoked")
        if donor.cert_sha256 != cert_sha256:
            raise Refused(
                Code.UNAUTHENTICATED,
                f"donor {donor_id}: this certificate was replaced by a newer enrollment",
            )
        return donor

    async def open_session(self, donor_id: str, cert_sha256: str) -> DonorSession:
        donor = await self.check_donor(donor_id, cert_sha256)
        self._donors[donor_id] = donor
        previous = self._sessions.get(donor_id)
        if previous is not None:
            previous.close(Refused(Code.ABORTED, "replaced by a newer connection"))
        session = DonorSession(donor_id=donor_id, hostname=donor.hostname, opened_at=self._clock())
        self._sessions[donor_id] = session
        session.send(
            link.Welcome(
                donor_id=donor_id,
                lease_ttl_s=int(self.config.lease_ttl.total_seconds()),
                report_interval_s=int(self.config.report_interval.total_seconds()),
            )
        )
        log.info("donor %s (%s) connected", donor_id, donor.hostname)
        return session

    def close_session(self, session: DonorSession) -> None:
        if self._sessions.get(session.donor_id) is session:
            del self._sessions[session.donor_id]
            log.info("donor %s disconnected", session.donor_id)

    async def on_event(self, session: DonorSession, event: link.DonorEvent) -> None:
        """Handle one event from a donor. Raises Refused for a protocol violation (the
        servicer ends the stream with it)."""
        message = event.message
        if not session.hello_seen and not isinstance(message, link.Hello):
            raise Refused(Code.FAILED_PRECONDITION, "the first event must be a hello")
        if isinstance(message, link.Hello):
            if session.hello_seen:
                raise Refused(Code.FAILED_PRECONDITION, "hello: sent twice on one stream")
            session.hello_seen = True
            self._on_report(session, event.seq, message.capacity, message.guests, "")
            self._resend_assignments(session, {g.workload_id for g in message.guests})
        elif isinstance(message, link.Report):
            self._on_report(session, event.seq, message.capacity, message.guests, message.level)
        elif isinstance(message, link.Reclaim):
            await self._on_reclaim(session, message)
        else:
            await self._on_result(session, message)

    # --- reports: the hot path ---------------------------------------------------------

    def _on_report(
        self,
        session: DonorSession,
        seq: int,
        capacity: link.Capacity,
        guests: Sequence[link.GuestReport],
        level: str,
    ) -> None:
        now = self._clock()
        self._account_idle(session, capacity, now)
        had_room = session.capacity is None or session.capacity != capacity
        session.capacity = capacity
        session.level = level
        session.last_report_at = now
        self._seen[session.donor_id] = DonorSeen(session.donor_id, now, capacity)
        lease_until = now + self.config.lease_ttl
        for guest in guests:
            record = self._workloads.get(guest.workload_id)
            if (
                record is not None
                and record.donor_id == session.donor_id
                and record.epoch == guest.epoch
                and record.state in HELD_STATES
            ):
                self._workloads[record.workload_id] = replace(record, lease_until=lease_until)
                self._renewals[record.workload_id] = LeaseRenewal(
                    record.workload_id, session.donor_id, record.epoch, lease_until
                )
                self._note_guest_state(record, guest)
            elif self._arriving(session, guest):
                pass  # the move's own results decide (the target's report can beat them)
            elif guest.state is link.GuestState.STOPPED:
                self._clean_stopped_copy(session, record, guest)
            elif guest.workload_id not in session.fencing:
                session.fencing.add(guest.workload_id)
                self._spawn(self._fence(session, guest))
        session.send(link.Ack(event_seq=seq, lease_until=lease_until))
        if had_room:
            self._wake_placement.set()

    def _account_idle(self, session: DonorSession, capacity: link.Capacity, now: datetime) -> None:
        if session.last_report_at is None:
            return
        seconds = (now - session.last_report_at).total_seconds()
        if not 0 < seconds <= 2 * self.config.report_interval.total_seconds():
            return  # a gap: the donor was away, not idle
        sums = self._idle.setdefault((session.donor_id, hour_of_week(now)), [0.0, 0.0])
        sums[0] += seconds
        if capacity.idle:
            sums[1] += seconds

    def _arriving(self, session: DonorSession, guest: link.GuestReport) -> bool:
        """The donor is the target of a live move under way, at that move's epoch, and
        does not report the guest running: not a stale copy to fence. Found by the
        migration benchmark: the target reported the incoming guest "failed" (libvirt
        busy finishing the move), was fenced, and its StopWorkload destroyed the guest
        the moment it had arrived. A running report goes on to adoption (`_fence`)."""
        move = self._moves.get(guest.workload_id)
        return (
            move is not None
            and move.live
            and move.target == session.donor_id
            and move.target_epoch == guest.epoch
            and guest.state not in (link.GuestState.RUNNING, link.GuestState.PAUSED)
        )

    def _clean_stopped_copy(
        self, session: DonorSession, record: WorkloadRecord | None, guest: link.GuestReport
    ) -> None:
        """A donor holds a stopped copy it is not the holder of (a prepared migration that
        never arrived, a fenced copy): tell it once to forget it — unless a move to it may
        still be under way."""
        move = self._moves.get(guest.workload_id)
        if move is not None and move.target == session.donor_id:
            return
        if _newer_copy_of_evacuating(record, guest):
            return  # a move target from before a restart: left until the move is over
        key = (guest.workload_id, guest.epoch)
        if key in session.cleaned:
            return
        session.cleaned.add(key)
        session.send(link.StopWorkload(guest.workload_id, guest.epoch, "not held by this donor"))

    def _note_guest_state(self, record: WorkloadRecord, guest: link.GuestReport) -> None:
        if guest.state is link.GuestState.RUNNING:
            self._running_since.setdefault((record.workload_id, record.epoch), self._clock())
        if record.state is WorkloadState.EVACUATING and guest.state is not link.GuestState.FAILED:
            return  # a move is under way: its commands' results decide the next state
        if guest.state is link.GuestState.FAILED:
            new_state = WorkloadState.FAILED
        else:
            mapped = _REPORTED.get(guest.state)
            if mapped is None:
                return
            new_state = mapped
        if new_state is not record.state:
            self._spawn(
                self._change_state(record.workload_id, record.epoch, new_state, guest.detail)
            )

    async def _change_state(
        self, workload_id: str, epoch: int, state: WorkloadState, detail: str
    ) -> None:
        async with self._lock:
            record = self._workloads.get(workload_id)
            if record is None or record.epoch != epoch or record.state is state:
                return
            now = self._clock()
            event = WorkloadEvent(workload_id, now, state.value, record.donor_id, epoch, detail)
            await self._write(record, event=event, state=state, detail=detail)

    async def _write(self, record: WorkloadRecord, **changes: object) -> WorkloadRecord | None:
        """Compare-and-set through the store, then memory. None if the epoch moved on."""
        try:
            updated = await self._io(
                self.store.update_workload,
                record.workload_id,
                expected_epoch=record.epoch,
                now=self._clock(),
                **changes,
            )
        except Conflict:
            log.warning("workload %s changed under us; not updated", record.workload_id)
            return None
        if updated.state in FINAL_STATES:
            self._workloads.pop(updated.workload_id, None)
        else:
            self._workloads[updated.workload_id] = updated
        return updated

    async def _fence(self, session: DonorSession, guest: link.GuestReport) -> None:
        """The donor reports a workload it does not hold at that epoch."""
        try:
            record = self._workloads.get(guest.workload_id) or await self._io(
                self.store.get_workload, guest.workload_id
            )
            events = await self._io(self.store.workload_events, guest.workload_id)
            if record is None or not any(e.donor_id == session.donor_id for e in events):
                session.close(
                    Refused(
                        Code.PERMISSION_DENIED,
                        f"workload {guest.workload_id} was never assigned to donor"
                        f" {session.donor_id}",
                    )
                )
                return
            if record.donor_id == session.donor_id and record.epoch == guest.epoch:
                return  # renewed meanwhile (a race with a reassignment that failed)
            if record.state not in FINAL_STATES and arrived_by_migration(
                session.donor_id, guest, record.epoch, events
            ):
                await self._adopt_arrival(session, guest)
                return
            if await self._readopt(session, record, guest, events):
                return
            if _newer_copy_of_evacuating(record, guest):
                return  # a move target from before a restart: its move decides, not a fence
            reason = (
                f"stale epoch {guest.epoch}: the workload is at epoch {record.epoch}"
                + (f" on donor {record.donor_id}" if record.donor_id else " (requeued)")
                if record.state not in FINAL_STATES
                else f"the workload is {record.state.value}"
            )
            log.info(
                "fencing %s on donor %s (reported %s at epoch %d): %s",
                guest.workload_id,
                session.donor_id,
                guest.state.value,
                guest.epoch,
                reason,
            )
            session.send(link.StopWorkload(guest.workload_id, guest.epoch, reason))
        finally:
            session.fencing.discard(guest.workload_id)

    async def _readopt(
        self,
        session: DonorSession,
        record: WorkloadRecord,
        guest: link.GuestReport,
        events: Sequence[WorkloadEvent],
    ) -> bool:
        """The donor that last held a requeued workload comes back before it was placed
        elsewhere: the epoch never moved on, so no other copy can exist — keep the guest
        (and its state) where it is instead of restarting it from scratch."""
        placements = [e for e in events if e.kind == "placed"]
        if (
            record.state is not WorkloadState.QUEUED
            or record.epoch != guest.epoch
            or not placements
            or placements[-1].donor_id != session.donor_id
        ):
            return False
        state = _REPORTED.get(guest.state)
        if state is None or (
            guest.state is link.GuestState.CHECKPOINTED and record.checkpoint is not None
        ):
            # A saved copy whose checkpoint the coordinator has: placement restores it
            # wherever there is room; the donor's own copy goes.
            return False
        async with self._lock:
            current = self._workloads.get(record.workload_id)
            if current is None or current.state is not WorkloadState.QUEUED:
                return False
            if current.epoch != guest.epoch:
                return False
            now = self._clock()
            updated = await self._write(
                current,
                event=WorkloadEvent(
                    current.workload_id,
                    now,
                    "readopted",
                    session.donor_id,
                    current.epoch,
                    "its donor came back before it was placed elsewhere",
                ),
                state=state,
                donor_id=session.donor_id,
                lease_until=now + self.config.lease_ttl,
                detail="",
            )
        if updated is not None:
            log.info(
                "workload %s stays on donor %s (epoch %d)",
                updated.workload_id,
                session.donor_id,
                updated.epoch,
            )
        return updated is not None

    def _resend_assignments(self, session: DonorSession, reported: set[str]) -> None:
        """Commands can be lost with a broken stream: resend RunWorkload (idempotent on the
        donor) for assignments the donor does not report yet."""
        for record in self.held_by(session.donor_id):
            if record.workload_id not in reported and record.state is WorkloadState.ASSIGNED:
                session.send(self._run_command(record))

    @staticmethod
    def _run_command(record: WorkloadRecord) -> link.RunWorkload:
        return link.RunWorkload(
            record.workload_id, record.epoch, record.spec, record.priority, record.checkpoint
        )

    # --- reclaim and command results ------------------------------------------------------

    def _offers(self, exclude: Iterable[str] = ()) -> list[Offer]:
        excluded = set(exclude)
        offers = []
        for donor_id, session in self._sessions.items():
            donor = self._donors.get(donor_id)
            if (
                donor_id in excluded
                or session.capacity is None
                or session.closed
                or (donor is not None and (donor.drained or donor.revoked))
                # Its owner stayed and it is handing its guests back: give it none.
                or session.level in RECLAIMING_LEVELS
            ):
                continue
            capacity = session.capacity
            offers.append(
                offer_from_capacity(
                    donor_id,
                    arch=capacity.arch,
                    cores=capacity.cores,
                    lend_cpu_percent=capacity.lend_cpu_percent,
                    lend_memory_mib=capacity.lend_memory_mib,
                    held=[_demand(w) for w in self.held_by(donor_id)],
                    lend_until=capacity.lend_until,
                    idle_ratio=self._idle_ratios.get(donor_id),
                )
            )
        return offers

    async def _on_reclaim(self, session: DonorSession, message: link.Reclaim) -> None:
        async with self._lock:
            for workload_id in message.workload_ids:
                record = self._workloads.get(workload_id)
                if record is None or record.donor_id != session.donor_id:
                    log.info(
                        "donor %s reclaims %s, which it does not hold",
                        session.donor_id,
                        workload_id,
                    )
                    continue
                if record.workload_id in self._moves or record.state is WorkloadState.CHECKPOINTED:
                    continue  # already answered
                await self._evacuate(session, record, message.reason)

    async def _next_epoch(self, record: WorkloadRecord) -> int:
        floor = self._epoch_floor.get(record.workload_id)
        if floor is None:
            events = await self._io(self.store.workload_events, record.workload_id)
            floor = next_epoch(record.epoch, events) - 1
        epoch = max(floor, record.epoch) + 1
        self._epoch_floor[record.workload_id] = epoch
        return epoch

    async def _evacuate(
        self,
        session: DonorSession,
        record: WorkloadRecord,
        reason: str,
        target: str | None = None,
        cold: bool = False,
    ) -> None:
        """Under the lock: start moving `record` off `session`'s donor — live to `target`
        (default: the best idle donor), cold if asked, or (no donor has room) checkpoint
        it and requeue it."""
        now = self._clock()
        target = target or evacuation_target(
            _demand(record), self._offers(exclude=[session.donor_id]), session.donor_id
        )
        target_session = self._sessions.get(target) if target else None
        if target is None or target_session is None:
            updated = await self._write(
                record,
                event=WorkloadEvent(
                    record.workload_id,
                    now,
                    "checkpoint-requested",
                    session.donor_id,
                    record.epoch,
                    f"{reason}: no donor has room",
                ),
                state=WorkloadState.EVACUATING,
                detail="saving: no donor has room",
            )
            if updated is not None:
                self._moves[record.workload_id] = Move(
                    record.workload_id,
                    session.donor_id,
                    record.epoch,
                    None,
                    0,
                    Phase.SAVING,
                    now,
                    now + self.config.cold_move_deadline,
                    reason,
                )
                session.send(link.Checkpoint(record.workload_id, record.epoch, upload=True))
            return
        target_epoch = await self._next_epoch(record)
        updated = await self._write(
            record,
            # donor_id = the target: this event is what lets the target be adopted as the
            # holder if it reports the guest running at target_epoch (moves.py).
            event=WorkloadEvent(
                record.workload_id,
                now,
                MIGRATE_EVENT,
                target,
                target_epoch,
                f"{reason}: from donor {session.donor_id}",
            ),
            state=WorkloadState.EVACUATING,
            detail=f"moving to {target}",
        )
        if updated is None:
            return
        limits = self.config.migration
        if cold:
            move = Move(
                record.workload_id,
                session.donor_id,
                record.epoch,
                target,
                target_epoch,
                Phase.SAVING,
                now,
                now + self.config.cold_move_deadline,
                reason,
                live_error="cold by request",
            )
            self._moves[record.workload_id] = move
            session.send(link.Checkpoint(record.workload_id, record.epoch, upload=True))
            return
        self._moves[record.workload_id] = Move(
            record.workload_id,
            session.donor_id,
            record.epoch,
            target,
            target_epoch,
            Phase.PREPARING,
            now,
            now + timedelta(seconds=limits.deadline_s + 60),
            reason,
        )
        target_session.send(
            link.PrepareMigration(record.workload_id, target_epoch, record.spec, session.donor_id)
        )

    async def _on_result(self, session: DonorSession, result: link.CommandResult) -> None:
        command = session.pending.pop(result.command_seq, None)
        if command is None:
            return
        if not result.ok:
            log.info("donor %s: command %s failed: %s", session.donor_id, command, result.error)
        async with self._lock:
            if isinstance(command, link.PrepareMigration):
                await self._on_prepared(command, result)
            elif isinstance(command, link.Evacuate):
                await self._on_migrated(command, result)
            elif isinstance(command, link.Checkpoint):
                await self._on_checkpointed(session, command, result)
            elif isinstance(command, link.StopWorkload) and not result.ok:
                # e.g. a guest still arriving: ask again when it is reported stopped.
                session.cleaned.discard((command.workload_id, command.epoch))
            elif isinstance(command, link.RunWorkload) and not result.ok:
                record = self._workloads.get(command.workload_id)
                if record is not None and record.epoch == command.epoch:
                    await self._write(
                        record,
                        event=WorkloadEvent(
                            record.workload_id,
                            self._clock(),
                            "failed",
                            session.donor_id,
                            record.epoch,
                            result.error,
                        ),
                        state=WorkloadState.FAILED,
                        detail=result.error,
                    )

    def _current_move(self, workload_id: str, phase: Phase, epoch: int) -> Move | None:
        """The move a command result belongs to, if it is still the one under way."""
        move = self._moves.get(workload_id)
        record = self._workloads.get(workload_id)
        if (
            move is None
            or move.phase is not phase
            or record is None
            or record.epoch != move.source_epoch
            or epoch not in (move.source_epoch, move.target_epoch)
        ):
            return None
        return move

    async def _on_prepared(
        self, command: link.PrepareMigration, result: link.CommandResult
    ) -> None:
        move = self._current_move(command.workload_id, Phase.PREPARING, command.epoch)
        if move is None:
            return
        if not result.ok or result.prepared is None:
            await self._go_cold(move, f"the target could not prepare: {result.error}")
            return
        source = self._sessions.get(move.source)
        if source is None:
            return  # the source is gone: its lease decides (sweep)
        move.phase = Phase.MIGRATING
        source.send(
            link.Evacuate(
                move.workload_id,
                move.source_epoch,
                move.target or "",
                result.prepared,
                move.target_epoch,
                self.config.migration,
            )
        )

    async def _on_migrated(self, command: link.Evacuate, result: link.CommandResult) -> None:
        move = self._current_move(command.workload_id, Phase.MIGRATING, command.epoch)
        if move is None:
            return
        if not result.ok:
            await self._go_cold(move, f"live migration failed: {result.error}")
            return
        report = result.migration
        detail = f"live from donor {move.source}" + (
            f" in {report.seconds:.1f} s, downtime {report.downtime_ms:.0f} ms" if report else ""
        )
        await self._finish_arrival(move, move.target or "", move.target_epoch, detail)

    async def _adopt_arrival(self, session: DonorSession, guest: link.GuestReport) -> None:
        """A donor reports running a workload at the epoch of a live move to it: the move
        completed (perhaps before a coordinator restart lost it)."""
        async with self._lock:
            record = self._workloads.get(guest.workload_id)
            if record is None or record.epoch >= guest.epoch:
                return
            now = self._clock()
            # Described from the record: whatever move is under way (this attempt, a later
            # one, or none after a restart) is moot once the guest has arrived.
            move = Move(
                guest.workload_id,
                record.donor_id or "",
                record.epoch,
                session.donor_id,
                guest.epoch,
                Phase.MIGRATING,
                now,
                now,
                "",
            )
            await self._finish_arrival(
                move,
                session.donor_id,
                guest.epoch,
                f"live from donor {move.source} (reported running by the target)",
                _REPORTED.get(guest.state, WorkloadState.RUNNING),
            )

    async def _finish_arrival(
        self,
        move: Move,
        target: str,
        epoch: int,
        detail: str,
        state: WorkloadState = WorkloadState.RUNNING,
    ) -> None:
        record = self._workloads.get(move.workload_id)
        if record is None or record.epoch != move.source_epoch:
            self._moves.pop(move.workload_id, None)
            return
        now = self._clock()
        try:
            updated = await self._write(
                record,
                event=WorkloadEvent(move.workload_id, now, "moved", target, epoch, detail),
                state=state,
                donor_id=target,
                epoch=epoch,
                lease_until=now + self.config.lease_ttl,
                detail=detail,
            )
        finally:
            # Only now: until the record names the target, the target's reports must
            # still be seen as arriving (`_arriving`), not as a stale copy.
            self._moves.pop(move.workload_id, None)
        if updated is not None:
            log.info("workload %s moved to donor %s: %s", move.workload_id, target, detail)

    async def _go_cold(self, move: Move, why: str) -> None:
        """The live attempt failed: the source saves and uploads; the target (told to
        forget what it prepared) then restores the checkpoint."""
        record = self._workloads.get(move.workload_id)
        if record is None:
            self._moves.pop(move.workload_id, None)
            return
        target = self._sessions.get(move.target or "")
        if target is not None:
            target.send(
                link.StopWorkload(move.workload_id, move.target_epoch, "migration abandoned")
            )
        await self._write(
            record,
            event=WorkloadEvent(
                move.workload_id, self._clock(), "migrate-failed", move.source, record.epoch, why
            ),
            detail=f"moving cold to {move.target}: {why}",
        )
        move.phase = Phase.SAVING
        move.live_error = why
        move.deadline = self._clock() + self.config.cold_move_deadline
        source = self._sessions.get(move.source)
        if source is not None:
            source.send(link.Checkpoint(move.workload_id, move.source_epoch, upload=True))

    async def _on_checkpointed(
        self, session: DonorSession, command: link.Checkpoint, result: link.CommandResult
    ) -> None:
        if command.keep_running:
            move = self._moves.get(command.workload_id)
            if move is not None and move.phase is Phase.PERIODIC:
                self._moves.pop(command.workload_id, None)  # nothing moves
            return
        move = self._current_move(command.workload_id, Phase.SAVING, command.epoch)
        record = self._workloads.get(command.workload_id)
        if move is None or record is None:
            return
        self._moves.pop(move.workload_id, None)
        now = self._clock()
        if not result.ok or record.checkpoint is None or record.checkpoint.epoch != record.epoch:
            # Not saved (or not uploaded): the guest stays on its donor, whose reports say
            # what it is now (running, paused, or saved on its own disk).
            await self._write(
                record,
                event=WorkloadEvent(
                    move.workload_id,
                    now,
                    "checkpoint-failed",
                    session.donor_id,
                    record.epoch,
                    result.error,
                ),
                state=WorkloadState.PAUSED,
                detail=f"could not move: {result.error or 'no checkpoint uploaded'}",
            )
            return
        target = self._sessions.get(move.target or "")
        if target is None:
            await self._requeue(
                record,
                "checkpointed: no donor has room"
                if move.target is None
                else f"checkpointed; donor {move.target} went away",
            )
            return
        epoch = await self._next_epoch(record)
        updated = await self._write(
            record,
            event=WorkloadEvent(
                move.workload_id,
                now,
                "moved-cold",
                target.donor_id,
                epoch,
                f"from donor {move.source} through a checkpoint"
                + (f" ({move.live_error})" if move.live_error else ""),
            ),
            state=WorkloadState.ASSIGNED,
            donor_id=target.donor_id,
            epoch=epoch,
            lease_until=now + self.config.lease_ttl,
            detail=f"restoring from a checkpoint on {target.donor_id}",
        )
        if updated is not None:
            target.send(self._run_command(updated))

    # --- checkpoints ----------------------------------------------------------------------

    def holder_check(self, donor_id: str, workload_id: str, epoch: int) -> WorkloadRecord:
        """The workload, if `donor_id` holds it at `epoch`; Refused otherwise."""
        record = self._workloads.get(workload_id)
        if record is None:
            raise Refused(Code.NOT_FOUND, f"workload_id: no active workload {workload_id}")
        if record.donor_id != donor_id or record.epoch != epoch or record.state not in HELD_STATES:
            raise Refused(
                Code.PERMISSION_DENIED,
                f"workload {workload_id} is not held by donor {donor_id} at epoch {epoch}",
            )
        return record

    async def accept_checkpoint(
        self, donor_id: str, workload_id: str, epoch: int, sha256: str, size: int
    ) -> link.CheckpointInfo:
        """A checkpoint was uploaded and verified: it becomes the workload's latest."""
        async with self._lock:
            record = self.holder_check(donor_id, workload_id, epoch)
            now = self._clock()
            info = link.CheckpointInfo(sha256, size, epoch, now, donor_id)
            previous = record.checkpoint
            updated = await self._write(
                record,
                event=WorkloadEvent(
                    workload_id, now, "checkpoint", donor_id, epoch, f"{size / 2**20:.1f} MiB"
                ),
                checkpoint=info,
            )
            if updated is None:
                raise Refused(Code.ABORTED, f"workload {workload_id} changed; checkpoint dropped")
        if previous is not None and previous.sha256 != sha256:
            self.checkpoints.path(previous.sha256).unlink(missing_ok=True)
        return info

    def checkpoint_to_pull(
        self, donor_id: str, workload_id: str, epoch: int, sha256: str
    ) -> link.CheckpointInfo:
        record = self.holder_check(donor_id, workload_id, epoch)
        if record.checkpoint is None or record.checkpoint.sha256 != sha256:
            raise Refused(
                Code.NOT_FOUND, f"sha256: {sha256} is not the latest checkpoint of {workload_id}"
            )
        return record.checkpoint

    async def history(self, workload_id: str) -> tuple[WorkloadRecord, list[WorkloadEvent]]:
        record = self._workloads.get(workload_id) or await self._io(
            self.store.get_workload, workload_id
        )
        if record is None:
            raise Refused(Code.NOT_FOUND, f"id: no workload {workload_id}")
        return record, await self._io(self.store.workload_events, workload_id)

    async def _sweep_moves(self, now: datetime) -> None:
        """Moves past their deadline are given up (the guest stays at the source); a
        workload left evacuating by a restart is released for its donor's next reclaim."""
        async with self._lock:
            for move in [m for m in self._moves.values() if m.deadline < now]:
                self._moves.pop(move.workload_id, None)
                record = self._workloads.get(move.workload_id)
                target = self._sessions.get(move.target or "")
                if target is not None and move.live:
                    target.send(
                        link.StopWorkload(move.workload_id, move.target_epoch, "move timed out")
                    )
                if record is not None and record.state is WorkloadState.EVACUATING:
                    await self._write(
                        record,
                        event=WorkloadEvent(
                            move.workload_id,
                            now,
                            "move-abandoned",
                            move.source,
                            record.epoch,
                            f"no answer by {move.deadline:%H:%M:%S} ({move.phase.value})",
                        ),
                        state=WorkloadState.PAUSED,
                        detail="the move timed out; the guest stays on its donor",
                    )
            for record in list(self._workloads.values()):
                if (
                    record.state is WorkloadState.EVACUATING
                    and record.workload_id not in self._moves
                ):
                    # Our restart lost the move; the donors' reports (or an arrival) tell
                    # where the guest is, and its donor reclaims again if it must.
                    await self._write(
                        record,
                        event=WorkloadEvent(
                            record.workload_id,
                            now,
                            "move-interrupted",
                            record.donor_id,
                            record.epoch,
                            "the coordinator restarted during the move",
                        ),
                        state=WorkloadState.PAUSED,
                        detail="a move was interrupted by a coordinator restart",
                    )

    def _ask_periodic_checkpoints(self, now: datetime) -> None:
        interval = self.config.checkpoint_interval
        if interval is None:
            return
        for record in self._workloads.values():
            if record.state is not WorkloadState.RUNNING or record.workload_id in self._moves:
                continue
            since = self._running_since.get((record.workload_id, record.epoch))
            session = self._sessions.get(record.donor_id or "")
            if since is None or session is None:
                continue
            last = record.checkpoint.taken_at if record.checkpoint is not None else since
            if max(last, since) + interval > now:
                continue
            self._moves[record.workload_id] = Move(
                record.workload_id,
                session.donor_id,
                record.epoch,
                None,
                0,
                Phase.PERIODIC,
                now,
                now + self.config.cold_move_deadline,
                "periodic checkpoint",
            )
            session.send(
                link.Checkpoint(record.workload_id, record.epoch, upload=True, keep_running=True)
            )

    # --- placement ------------------------------------------------------------------------

    async def _placement_loop(self) -> None:
        interval = self.config.placement_interval.total_seconds()
        while True:
            # Not asyncio.wait_for: before Python 3.12 it can swallow a cancellation
            # that races with the event being set, and stop() would wait forever.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):
                    await self._wake_placement.wait()
            self._wake_placement.clear()
            try:
                await self.place_queued()
            except Exception:
                log.exception("placement failed")

    async def _refresh_idle_ratios(self, now: datetime) -> None:
        hour = hour_of_week(now)
        if hour != self._idle_ratios_hour:
            self._idle_ratios = await self._io(self.store.idle_ratios, list(self._sessions), hour)
            self._idle_ratios_hour = hour

    async def place_queued(self) -> int:
        """Assign queued workloads to donors with room; returns how many were placed."""
        async with self._lock:
            # A workload some donor just reported is being checked (it may be re-adopted
            # by its last donor): not placed until that check is done.
            checking = {w for session in self._sessions.values() for w in session.fencing}
            queued = sorted(
                (
                    w
                    for w in self._workloads.values()
                    if w.state is WorkloadState.QUEUED and w.workload_id not in checking
                ),
                key=lambda w: w.created_at,
            )
            if not queued or not self._sessions:
                return 0
            now = self._clock()
            await self._refresh_idle_ratios(now)
            choices = place([_demand(w) for w in queued], self._offers())
            placed = 0
            for record in queued:
                donor_id = choices.get(record.workload_id)
                session = self._sessions.get(donor_id) if donor_id else None
                if donor_id is None or session is None:
                    continue
                epoch = await self._next_epoch(record)
                updated = await self._write(
                    record,
                    event=WorkloadEvent(record.workload_id, now, "placed", donor_id, epoch),
                    state=WorkloadState.ASSIGNED,
                    donor_id=donor_id,
                    epoch=epoch,
                    lease_until=now + self.config.lease_ttl,
                    detail="",
                )
                if updated is not None:
                    session.send(self._run_command(updated))
                    placed += 1
                    log.info(
                        "placed %s on donor %s (epoch %d)", record.workload_id, donor_id, epoch
                    )
            return placed

    # --- leases and lost donors ------------------------------------------------------------

    async def sweep(self) -> None:
        """Requeue workloads whose lease ended; mark silent donors lost."""
        now = self._clock()
        self._ask_periodic_checkpoints(now)
        if now < self._grace_until:
            return
        await self._sweep_moves(now)
        expired = [
            w
            for w in self._workloads.values()
            if w.state in HELD_STATES and w.lease_until is not None and w.lease_until < now
        ]
        if expired:
            async with self._lock:
                for record in expired:
                    current = self._workloads.get(record.workload_id)
                    if current is None or current.lease_until is None or current.lease_until >= now:
                        continue
                    self._moves.pop(current.workload_id, None)
                    await self._requeue(current, f"lease expired on donor {current.donor_id}")
        silent_after = now - self.config.lease_ttl
        for donor in list(self._donors.values()):
            if (
                not donor.lost
                and donor.donor_id not in self._sessions
                and donor.last_seen is not None
                and donor.last_seen < silent_after
            ):
                self._donors[donor.donor_id] = await self._io(
                    self.store.set_donor_flags, donor.donor_id, lost=True
                )
                log.warning("donor %s is lost (silent since %s)", donor.donor_id, donor.last_seen)

    async def _requeue(self, record: WorkloadRecord, reason: str) -> None:
        updated = await self._write(
            record,
            event=WorkloadEvent(
                record.workload_id, self._clock(), "requeued", record.donor_id, record.epoch, reason
            ),
            state=WorkloadState.QUEUED,
            clear_donor=True,
            detail=reason,
        )
        if updated is not None:
            log.info("requeued %s: %s", record.workload_id, reason)
            self._wake_placement.set()

    # --- batches --------------------------------------------------------------------------

    async def flush(self) -> None:
        """Write the batched reports: last seen, leases, idle history."""
        seen, self._seen = self._seen, {}
        renewals, self._renewals = self._renewals, {}
        idle, self._idle = self._idle, {}
        if seen:
            await self._io(self.store.record_seen, list(seen.values()))
            for item in seen.values():
                donor = self._donors.get(item.donor_id)
                if donor is not None:
                    self._donors[item.donor_id] = replace(
                        donor, last_seen=item.last_seen, capacity=item.capacity, lost=False
                    )
        if renewals:
            await self._io(self.store.renew_leases, list(renewals.values()))
        if idle:
            await self._io(
                self.store.add_idle_samples,
                [IdleSample(d, h, sums[0], sums[1]) for (d, h), sums in idle.items()],
            )

    # --- admin ----------------------------------------------------------------------------

    async def add_donor(self, donor: DonorRecord) -> None:
        await self._io(self.store.add_donor, donor)
        self._donors[donor.donor_id] = donor

    async def add_image(self, sha256: str, size: int) -> None:
        await self._io(self.store.add_image, ImageRecord(sha256, size, self._clock()))

    async def submit(self, spec: VmSpec, priority: int) -> WorkloadRecord:
        for sha256 in spec.images():
            if not self.images.has(sha256):
                raise Refused(
                    Code.FAILED_PRECONDITION,
                    f"unknown workload image {sha256}: upload it first",
                )
        async with self._lock:
            if any(w.spec.name == spec.name for w in self._workloads.values()):
                raise Refused(
                    Code.ALREADY_EXISTS, f"spec.name: a workload named {spec.name!r} is active"
                )
            now = self._clock()
            record = WorkloadRecord(
                workload_id=new_id("w"),
                spec=spec,
                priority=priority,
                state=WorkloadState.QUEUED,
                created_at=now,
                updated_at=now,
            )
            await self._io(
                self.store.add_workload,
                record,
                WorkloadEvent(record.workload_id, now, "submitted"),
            )
            self._workloads[record.workload_id] = record
        self._wake_placement.set()
        log.info("workload %s (%s) submitted", record.workload_id, spec.name)
        return record

    async def list_workloads(self) -> list[WorkloadRecord]:
        return await self._io(self.store.list_workloads)

    async def list_donors(self) -> list[DonorRecord]:
        return await self._io(self.store.list_donors)

    async def cancel(self, workload_id: str) -> WorkloadRecord:
        async with self._lock:
            record = self._workloads.get(workload_id)
            if record is None:
                stored = await self._io(self.store.get_workload, workload_id)
                if stored is None:
                    raise Refused(Code.NOT_FOUND, f"id: no workload {workload_id}")
                return stored  # already final: cancelling again changes nothing
            session = self._sessions.get(record.donor_id or "")
            updated = await self._write(
                record,
                event=WorkloadEvent(workload_id, self._clock(), "cancelled", record.donor_id),
                state=WorkloadState.CANCELLED,
                detail="cancelled by the administrator",
            )
            if updated is None:
                raise Refused(Code.ABORTED, f"workload {workload_id} changed; try again")
            if session is not None and record.state in HELD_STATES:
                session.send(link.StopWorkload(workload_id, record.epoch, "cancelled"))
            return updated

    async def move(
        self, workload_id: str, target: str | None = None, cold: bool = False
    ) -> WorkloadRecord:
        """The admin's move: off its donor now, to `target` or the best idle donor."""
        async with self._lock:
            record = self._workloads.get(workload_id)
            if record is None:
                raise Refused(Code.NOT_FOUND, f"id: no active workload {workload_id}")
            session = self._sessions.get(record.donor_id or "")
            if record.state not in (WorkloadState.RUNNING, WorkloadState.PAUSED) or session is None:
                raise Refused(
                    Code.FAILED_PRECONDITION,
                    f"workload {workload_id} is {record.state.value}"
                    + ("" if session else " and its donor is not connected")
                    + ": only a running or paused workload on a connected donor can move",
                )
            if workload_id in self._moves:
                raise Refused(Code.FAILED_PRECONDITION, f"workload {workload_id} is moving already")
            if target is not None:
                if target == record.donor_id:
                    raise Refused(
                        Code.INVALID_ARGUMENT, f"target_donor_id: {target} already runs it"
                    )
                if target not in self._sessions:
                    raise Refused(
                        Code.FAILED_PRECONDITION,
                        f"target_donor_id: donor {target} is not connected",
                    )
            await self._evacuate(session, record, "moved by the administrator", target, cold)
            return self._workloads.get(workload_id, record)

    async def _donor(self, donor_id: str) -> DonorRecord:
        donor = await self._io(self.store.get_donor, donor_id)
        if donor is None:
            raise Refused(Code.NOT_FOUND, f"id: no donor {donor_id}")
        return donor

    async def drain(self, donor_id: str) -> DonorRecord:
        await self._donor(donor_id)
        async with self._lock:
            donor = await self._io(self.store.set_donor_flags, donor_id, drained=True)
            self._donors[donor_id] = donor
            session = self._sessions.get(donor_id)
            for record in self.held_by(donor_id):
                if session is not None and record.workload_id not in self._moves:
                    await self._evacuate(session, record, "drained")
        log.info("donor %s drained", donor_id)
        return donor

    async def revoke(self, donor_id: str) -> DonorRecord:
        await self._donor(donor_id)
        async with self._lock:
            donor = await self._io(self.store.set_donor_flags, donor_id, revoked=True)
            self._donors[donor_id] = donor
            session = self._sessions.pop(donor_id, None)
            if session is not None:
                session.close(Refused(Code.PERMISSION_DENIED, f"donor {donor_id} was revoked"))
            for record in self.held_by(donor_id):
                await self._requeue(record, f"donor {donor_id} was revoked")
        log.warning("donor %s revoked", donor_id)
        return donor

    def donor_workload_ids(self) -> dict[str, list[str]]:
        result: dict[str, list[str]] = {}
        for record in self._workloads.values():
            if record.donor_id and record.state in HELD_STATES:
                result.setdefault(record.donor_id, []).append(record.workload_id)
        return result
