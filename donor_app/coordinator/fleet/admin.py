"""What the administrator does to the fleet: enroll donors and images into it, submit,
cancel and move workloads, drain and revoke donors, and read it all back.

Runs on the coordinator's loop, called by the Admin servicer (and enrollment); every
change takes the fleet lock and writes through the store first.
"""

from __future__ import annotations

import logging

from donor_app.coordinator.fleet.config import new_id
from donor_app.coordinator.fleet.moves import Moves
from donor_app.coordinator.fleet.session import Code, Refused
from donor_app.coordinator.fleet.state import FleetState
from donor_app.domain import link
from donor_app.domain.records import (
    HELD_STATES,
    DonorRecord,
    ImageRecord,
    WorkloadEvent,
    WorkloadRecord,
    WorkloadState,
)
from donor_app.domain.vm import VmSpec

log = logging.getLogger(__name__)


class Admin:
    def __init__(self, state: FleetState, moves: Moves) -> None:
        self._state = state
        self._moves = moves

    async def add_donor(self, donor: DonorRecord) -> None:
        await self._state.io(self._state.store.add_donor, donor)
        self._state.donors[donor.donor_id] = donor

    async def add_image(self, sha256: str, size: int) -> None:
        state = self._state
        await state.io(state.store.add_image, ImageRecord(sha256, size, state.clock()))

    async def submit(self, spec: VmSpec, priority: int) -> WorkloadRecord:
        state = self._state
        for sha256 in spec.images():
            if not state.images.has(sha256):
                raise Refused(
                    Code.FAILED_PRECONDITION,
                    f"unknown workload image {sha256}: upload it first",
                )
        async with state.lock:
            if any(w.spec.name == spec.name for w in state.workloads.values()):
                raise Refused(
                    Code.ALREADY_EXISTS, f"spec.name: a workload named {spec.name!r} is active"
                )
            now = state.clock()
            record = WorkloadRecord(
                workload_id=new_id("w"),
                spec=spec,
                priority=priority,
                state=WorkloadState.QUEUED,
                created_at=now,
                updated_at=now,
            )
            await state.io(
                state.store.add_workload,
                record,
                WorkloadEvent(record.workload_id, now, "submitted"),
            )
            state.workloads[record.workload_id] = record
        state.wake_placement.set()
        log.info("workload %s (%s) submitted", record.workload_id, spec.name)
        return record

    async def list_workloads(self) -> list[WorkloadRecord]:
        return await self._state.io(self._state.store.list_workloads)

    async def list_donors(self) -> list[DonorRecord]:
        return await self._state.io(self._state.store.list_donors)

    async def history(self, workload_id: str) -> tuple[WorkloadRecord, list[WorkloadEvent]]:
        state = self._state
        record = state.workloads.get(workload_id) or await state.io(
            state.store.get_workload, workload_id
        )
        if record is None:
            raise Refused(Code.NOT_FOUND, f"id: no workload {workload_id}")
        return record, await state.io(state.store.workload_events, workload_id)

    def donor_workload_ids(self) -> dict[str, list[str]]:
        result: dict[str, list[str]] = {}
        for record in self._state.workloads.values():
            if record.donor_id and record.state in HELD_STATES:
                result.setdefault(record.donor_id, []).append(record.workload_id)
        return result

    async def cancel(self, workload_id: str) -> WorkloadRecord:
        state = self._state
        async with state.lock:
            record = state.workloads.get(workload_id)
            if record is None:
                stored = await state.io(state.store.get_workload, workload_id)
                if stored is None:
                    raise Refused(Code.NOT_FOUND, f"id: no workload {workload_id}")
                return stored  # already final: cancelling again changes nothing
            session = state.sessions.get(record.donor_id or "")
            updated = await state.write(
                record,
                event=WorkloadEvent(workload_id, state.clock(), "cancelled", record.donor_id),
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
        state = self._state
        async with state.lock:
            record = state.workloads.get(workload_id)
            if record is None:
                raise Refused(Code.NOT_FOUND, f"id: no active workload {workload_id}")
            session = state.sessions.get(record.donor_id or "")
            if record.state not in (WorkloadState.RUNNING, WorkloadState.PAUSED) or session is None:
                raise Refused(
                    Code.FAILED_PRECONDITION,
                    f"workload {workload_id} is {record.state.value}"
                    + ("" if session else " and its donor is not connected")
                    + ": only a running or paused workload on a connected donor can move",
                )
            if workload_id in state.moves:
                raise Refused(Code.FAILED_PRECONDITION, f"workload {workload_id} is moving already")
            if target is not None:
                if target == record.donor_id:
                    raise Refused(
                        Code.INVALID_ARGUMENT, f"target_donor_id: {target} already runs it"
                    )
                if target not in state.sessions:
                    raise Refused(
                        Code.FAILED_PRECONDITION,
                        f"target_donor_id: donor {target} is not connected",
                    )
            await self._moves.evacuate(session, record, "moved by the administrator", target, cold)
            return state.workloads.get(workload_id, record)

    async def _donor(self, donor_id: str) -> DonorRecord:
        donor = await self._state.io(self._state.store.get_donor, donor_id)
        if donor is None:
            raise Refused(Code.NOT_FOUND, f"id: no donor {donor_id}")
        return donor

    async def drain(self, donor_id: str) -> DonorRecord:
        """No new work for the donor; what it holds moves away."""
        state = self._state
        await self._donor(donor_id)
        async with state.lock:
            donor = await state.io(state.store.set_donor_flags, donor_id, drained=True)
            state.donors[donor_id] = donor
            session = state.sessions.get(donor_id)
            for record in state.held_by(donor_id):
                if session is not None and record.workload_id not in state.moves:
                    await self._moves.evacuate(session, record, "drained")
        log.info("donor %s drained", donor_id)
        return donor

    async def revoke(self, donor_id: str) -> DonorRecord:
        """The donor may never connect again; what it held is requeued at once."""
        state = self._state
        await self._donor(donor_id)
        async with state.lock:
            donor = await state.io(state.store.set_donor_flags, donor_id, revoked=True)
            state.donors[donor_id] = donor
            session = state.sessions.pop(donor_id, None)
            if session is not None:
                session.close(Refused(Code.PERMISSION_DENIED, f"donor {donor_id} was revoked"))
            for record in state.held_by(donor_id):
                await state.requeue(record, f"donor {donor_id} was revoked")
        log.warning("donor %s revoked", donor_id)
        return donor
