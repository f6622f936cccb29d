"""Moving workloads between donors: starting a move (a donor reclaims its machine, an
admin moves or drains), following it through the donors' command results, giving it up
at its deadline, and asking for periodic checkpoints. The protocol of a move and the
record kept while it happens are in move.py.

Runs on the coordinator's loop. Every method that changes a workload is called with the
fleet lock held (the callers take it), except `ask_periodic_checkpoints`, which only
sends commands and notes the move.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from donor_app.coordinator.fleet.config import REPORTED, run_command
from donor_app.coordinator.fleet.move import MIGRATE_EVENT, Move, Phase
from donor_app.coordinator.fleet.placement import Placement
from donor_app.coordinator.fleet.session import DonorSession
from donor_app.coordinator.fleet.state import FleetState, demand
from donor_app.domain import link
from donor_app.domain.placement import evacuation_target
from donor_app.domain.records import WorkloadEvent, WorkloadRecord, WorkloadState

log = logging.getLogger(__name__)


class Moves:
    def __init__(self, state: FleetState, placement: Placement) -> None:
        self._state = state
        self._placement = placement

    # --- starting a move -------------------------------------------------------------

    async def on_reclaim(self, session: DonorSession, message: link.Reclaim) -> None:
        """The donor's owner stayed: move what it holds elsewhere (takes the lock)."""
        state = self._state
        async with state.lock:
            for workload_id in message.workload_ids:
                record = state.workloads.get(workload_id)
                if record is None or record.donor_id != session.donor_id:
                    log.info(
                        "donor %s reclaims %s, which it does not hold",
                        session.donor_id,
                        workload_id,
                    )
                    continue
                if record.workload_id in state.moves or record.state is WorkloadState.CHECKPOINTED:
                    continue  # already answered
                await self.evacuate(session, record, message.reason)

    async def evacuate(
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
        state = self._state
        now = state.clock()
        target = target or evacuation_target(
            demand(record), self._placement.offers(exclude=[session.donor_id]), session.donor_id
        )
        target_session = state.sessions.get(target) if target else None
        if target is None or target_session is None:
            updated = await state.write(
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
                state.moves[record.workload_id] = Move(
                    record.workload_id,
                    session.donor_id,
                    record.epoch,
                    None,
                    0,
                    Phase.SAVING,
                    now,
                    now + state.config.cold_move_deadline,
                    reason,
                )
                session.send(link.Checkpoint(record.workload_id, record.epoch, upload=True))
            return
        target_epoch = await state.next_epoch(record)
        updated = await state.write(
            record,
            # donor_id = the target: this event is what lets the target be adopted as the
            # holder if it reports the guest running at target_epoch (move.py).
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
        limits = state.config.migration
        if cold:
            move = Move(
                record.workload_id,
                session.donor_id,
                record.epoch,
                target,
                target_epoch,
                Phase.SAVING,
                now,
                now + state.config.cold_move_deadline,
                reason,
                live_error="cold by request",
            )
            state.moves[record.workload_id] = move
            session.send(link.Checkpoint(record.workload_id, record.epoch, upload=True))
            return
        state.moves[record.workload_id] = Move(
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

    # --- following a move through the donors' results -----------------------------------

    def _current_move(self, workload_id: str, phase: Phase, epoch: int) -> Move | None:
        """The move a command result belongs to, if it is still the one under way."""
        move = self._state.moves.get(workload_id)
        record = self._state.workloads.get(workload_id)
        if (
            move is None
            or move.phase is not phase
            or record is None
            or record.epoch != move.source_epoch
            or epoch not in (move.source_epoch, move.target_epoch)
        ):
            return None
        return move

    async def on_prepared(self, command: link.PrepareMigration, result: link.CommandResult) -> None:
        """Under the lock: the target prepared (the source now migrates) or could not
        (the move goes cold)."""
        move = self._current_move(command.workload_id, Phase.PREPARING, command.epoch)
        if move is None:
            return
        if not result.ok or result.prepared is None:
            await self._go_cold(move, f"the target could not prepare: {result.error}")
            return
        source = self._state.sessions.get(move.source)
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
                self._state.config.migration,
            )
        )

    async def on_migrated(self, command: link.Evacuate, result: link.CommandResult) -> None:
        """Under the lock: the source's live migration ended."""
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

    async def adopt_arrival(self, session: DonorSession, guest: link.GuestReport) -> None:
        """A donor reports running a workload at the epoch of a live move to it: the move
        completed (perhaps before a coordinator restart lost it). Takes the lock."""
        state = self._state
        async with state.lock:
            record = state.workloads.get(guest.workload_id)
            if record is None or record.epoch >= guest.epoch:
                return
            now = state.clock()
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
                REPORTED.get(guest.state, WorkloadState.RUNNING),
            )

    async def _finish_arrival(
        self,
        move: Move,
        target: str,
        epoch: int,
        detail: str,
        new_state: WorkloadState = WorkloadState.RUNNING,
    ) -> None:
        state = self._state
        record = state.workloads.get(move.workload_id)
        if record is None or record.epoch != move.source_epoch:
            state.moves.pop(move.workload_id, None)
            return
        now = state.clock()
        try:
            updated = await state.write(
                record,
                event=WorkloadEvent(move.workload_id, now, "moved", target, epoch, detail),
                state=new_state,
                donor_id=target,
                epoch=epoch,
                lease_until=now + state.config.lease_ttl,
                detail=detail,
            )
        finally:
            # Only now: until the record names the target, the target's reports must
            # still be seen as arriving (fencing.py), not as a stale copy.
            state.moves.pop(move.workload_id, None)
        if updated is not None:
            log.info("workload %s moved to donor %s: %s", move.workload_id, target, detail)

    async def _go_cold(self, move: Move, why: str) -> None:
        """The live attempt failed: the source saves and uploads; the target (told to
        forget what it prepared) then restores the checkpoint."""
        state = self._state
        record = state.workloads.get(move.workload_id)
        if record is None:
            state.moves.pop(move.workload_id, None)
            return
        target = state.sessions.get(move.target or "")
        if target is not None:
            target.send(
                link.StopWorkload(move.workload_id, move.target_epoch, "migration abandoned")
            )
        await state.write(
            record,
            event=WorkloadEvent(
                move.workload_id, state.clock(), "migrate-failed", move.source, record.epoch, why
            ),
            detail=f"moving cold to {move.target}: {why}",
        )
        move.phase = Phase.SAVING
        move.live_error = why
        move.deadline = state.clock() + state.config.cold_move_deadline
        source = state.sessions.get(move.source)
        if source is not None:
            source.send(link.Checkpoint(move.workload_id, move.source_epoch, upload=True))

    async def on_checkpointed(
        self, session: DonorSession, command: link.Checkpoint, result: link.CommandResult
    ) -> None:
        """Under the lock: the source saved (and uploaded) its guest, or could not. A
        cold move's target now restores it; with no target the workload is requeued."""
        state = self._state
        if command.keep_running:
            move = state.moves.get(command.workload_id)
            if move is not None and move.phase is Phase.PERIODIC:
                state.moves.pop(command.workload_id, None)  # nothing moves
            return
        move = self._current_move(command.workload_id, Phase.SAVING, command.epoch)
        record = state.workloads.get(command.workload_id)
        if move is None or record is None:
            return
        state.moves.pop(move.workload_id, None)
        now = state.clock()
        if not result.ok or record.checkpoint is None or record.checkpoint.epoch != record.epoch:
            # Not saved (or not uploaded): the guest stays on its donor, whose reports say
            # what it is now (running, paused, or saved on its own disk).
            await state.write(
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
        target = state.sessions.get(move.target or "")
        if target is None:
            await state.requeue(
                record,
                "checkpointed: no donor has room"
                if move.target is None
                else f"checkpointed; donor {move.target} went away",
            )
            return
        epoch = await state.next_epoch(record)
        updated = await state.write(
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
            lease_until=now + state.config.lease_ttl,
            detail=f"restoring from a checkpoint on {target.donor_id}",
        )
        if updated is not None:
            target.send(run_command(updated))

    # --- deadlines and periodic checkpoints ------------------------------------------------

    async def sweep(self, now: datetime) -> None:
        """Moves past their deadline are given up (the guest stays at the source); a
        workload left evacuating by a restart is released for its donor's next reclaim.
        Takes the lock."""
        state = self._state
        async with state.lock:
            for move in [m for m in state.moves.values() if m.deadline < now]:
                state.moves.pop(move.workload_id, None)
                record = state.workloads.get(move.workload_id)
                target = state.sessions.get(move.target or "")
                if target is not None and move.live:
                    target.send(
                        link.StopWorkload(move.workload_id, move.target_epoch, "move timed out")
                    )
                if record is not None and record.state is WorkloadState.EVACUATING:
                    await state.write(
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
            for record in list(state.workloads.values()):
                if (
                    record.state is WorkloadState.EVACUATING
                    and record.workload_id not in state.moves
                ):
                    # Our restart lost the move; the donors' reports (or an arrival) tell
                    # where the guest is, and its donor reclaims again if it must.
                    await state.write(
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

    def ask_periodic_checkpoints(self, now: datetime) -> None:
        """Ask the donor of each workload running for `checkpoint_interval` since its
        last checkpoint for a new one (the guest keeps running)."""
        state = self._state
        interval = state.config.checkpoint_interval
        if interval is None:
            return
        for record in state.workloads.values():
            if record.state is not WorkloadState.RUNNING or record.workload_id in state.moves:
                continue
            since = state.running_since.get((record.workload_id, record.epoch))
            session = state.sessions.get(record.donor_id or "")
            if since is None or session is None:
                continue
            last = record.checkpoint.taken_at if record.checkpoint is not None else since
            if max(last, since) + interval > now:
                continue
            state.moves[record.workload_id] = Move(
                record.workload_id,
                session.donor_id,
                record.epoch,
                None,
                0,
                Phase.PERIODIC,
                now,
                now + state.config.cold_move_deadline,
                "periodic checkpoint",
            )
            session.send(
                link.Checkpoint(record.workload_id, record.epoch, upload=True, keep_running=True)
            )
