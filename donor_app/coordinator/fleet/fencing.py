"""Fencing: what to do about a guest a donor reports but does not hold at that epoch.

A guest must never run twice. Each assignment has an epoch; a donor that reports a
workload at an epoch other than the one it holds is, in order of the checks:
- refused outright (its stream closed) if the workload was never assigned to it;
- the target of a live move under way, reporting the guest not yet running: left to
  the move (`arriving`);
- the target of a live move that completed, perhaps before a coordinator restart:
  adopted as the holder (`Moves.adopt_arrival`);
- the last holder of a requeued workload, back before it was placed elsewhere: kept
  where it is (`readopt`), since the epoch never moved on;
- otherwise a stale copy: told to stop it (StopWorkload). A stopped copy it holds no
  more is told once to forget it (`clean_stopped_copy`).

Runs on the coordinator's loop. `arriving` and `clean_stopped_copy` are called from the
report hot path; `fence` runs as a background task (it reads the workload's events from
the store) and takes the lock only to change a workload.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from donor_app.coordinator.fleet.config import REPORTED, newer_copy_of_evacuating
from donor_app.coordinator.fleet.move import arrived_by_migration
from donor_app.coordinator.fleet.moves import Moves
from donor_app.coordinator.fleet.session import Code, DonorSession, Refused
from donor_app.coordinator.fleet.state import FleetState
from donor_app.domain import link
from donor_app.domain.records import FINAL_STATES, WorkloadEvent, WorkloadRecord, WorkloadState

log = logging.getLogger(__name__)


class Fencing:
    def __init__(self, state: FleetState, moves: Moves) -> None:
        self._state = state
        self._moves = moves

    def arriving(self, session: DonorSession, guest: link.GuestReport) -> bool:
        """The donor is the target of a live move under way, at that move's epoch, and
        does not report the guest running: not a stale copy to fence. Found by the
        migration benchmark: the target reported the incoming guest "failed" (libvirt
        busy finishing the move), was fenced, and its StopWorkload destroyed the guest
        the moment it had arrived. A running report goes on to adoption (`fence`)."""
        move = self._state.moves.get(guest.workload_id)
        return (
            move is not None
            and move.live
            and move.target == session.donor_id
            and move.target_epoch == guest.epoch
            and guest.state not in (link.GuestState.RUNNING, link.GuestState.PAUSED)
        )

    def clean_stopped_copy(
        self, session: DonorSession, record: WorkloadRecord | None, guest: link.GuestReport
    ) -> None:
        """A donor holds a stopped copy it is not the holder of (a prepared migration that
        never arrived, a fenced copy): tell it once to forget it — unless a move to it may
        still be under way."""
        move = self._state.moves.get(guest.workload_id)
        if move is not None and move.target == session.donor_id:
            return
        if newer_copy_of_evacuating(record, guest):
            return  # a move target from before a restart: left until the move is over
        key = (guest.workload_id, guest.epoch)
        if key in session.cleaned:
            return
        session.cleaned.add(key)
        session.send(link.StopWorkload(guest.workload_id, guest.epoch, "not held by this donor"))

    def start_fence(self, session: DonorSession, guest: link.GuestReport) -> None:
        """Fence in the background, once per workload at a time (a report repeated every
        few seconds fences once)."""
        if guest.workload_id in session.fencing:
            return
        session.fencing.add(guest.workload_id)
        self._state.spawn(self.fence(session, guest))

    async def fence(self, session: DonorSession, guest: link.GuestReport) -> None:
        """The donor reports a workload it does not hold at that epoch."""
        state = self._state
        try:
            record = state.workloads.get(guest.workload_id) or await state.io(
                state.store.get_workload, guest.workload_id
            )
            events = await state.io(state.store.workload_events, guest.workload_id)
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
                await self._moves.adopt_arrival(session, guest)
                return
            if await self._readopt(session, record, guest, events):
                return
            if newer_copy_of_evacuating(record, guest):
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
        new_state = REPORTED.get(guest.state)
        if new_state is None or (
            guest.state is link.GuestState.CHECKPOINTED and record.checkpoint is not None
        ):
            # A saved copy whose checkpoint the coordinator has: placement restores it
            # wherever there is room; the donor's own copy goes.
            return False
        state = self._state
        async with state.lock:
            current = state.workloads.get(record.workload_id)
            if current is None or current.state is not WorkloadState.QUEUED:
                return False
            if current.epoch != guest.epoch:
                return False
            now = state.clock()
            updated = await state.write(
                current,
                event=WorkloadEvent(
                    current.workload_id,
                    now,
                    "readopted",
                    session.donor_id,
                    current.epoch,
                    "its donor came back before it was placed elsewhere",
                ),
                state=new_state,
                donor_id=session.donor_id,
                lease_until=now + state.config.lease_ttl,
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
