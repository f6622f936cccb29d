"""The hot path: a donor's report (its capacity and the guests it runs) answered at once
with an Ack that renews the leases of what it holds; what must be kept is batched.

Runs on the coordinator's loop, for every report of every donor, so it touches only
memory and never takes the fleet lock: lease renewals, last-seen times and idle history
are collected here and written to the store by `flush` (the flush task, once a
`flush_interval`, in a worker thread). Anything slower that a report calls for (a fence,
a state change) is spawned as a background task.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime

from donor_app.coordinator.fleet.config import REPORTED
from donor_app.coordinator.fleet.fencing import Fencing
from donor_app.coordinator.fleet.session import DonorSession
from donor_app.coordinator.fleet.state import FleetState
from donor_app.domain import link
from donor_app.domain.decision import Level
from donor_app.domain.placement import hour_of_week
from donor_app.domain.records import (
    HELD_STATES,
    DonorSeen,
    IdleSample,
    LeaseRenewal,
    WorkloadEvent,
    WorkloadRecord,
    WorkloadState,
)

log = logging.getLogger(__name__)


class Reports:
    def __init__(self, state: FleetState, fencing: Fencing) -> None:
        self._state = state
        self._fencing = fencing
        # Batches for the next flush.
        self._seen: dict[str, DonorSeen] = {}
        self._renewals: dict[str, LeaseRenewal] = {}
        self._idle: dict[tuple[str, int], list[float]] = {}  # (donor, hour) → [seen s, idle s]

    def on_report(
        self,
        session: DonorSession,
        seq: int,
        capacity: link.Capacity,
        guests: Sequence[link.GuestReport],
        level: Level | None,
    ) -> None:
        state = self._state
        now = state.clock()
        self._account_idle(session, capacity, now)
        had_room = session.capacity is None or session.capacity != capacity
        session.capacity = capacity
        session.level = level
        session.last_report_at = now
        self._seen[session.donor_id] = DonorSeen(session.donor_id, now, capacity)
        lease_until = now + state.config.lease_ttl
        for guest in guests:
            record = state.workloads.get(guest.workload_id)
            if (
                record is not None
                and record.donor_id == session.donor_id
                and record.epoch == guest.epoch
                and record.state in HELD_STATES
            ):
                state.workloads[record.workload_id] = replace(record, lease_until=lease_until)
                self._renewals[record.workload_id] = LeaseRenewal(
                    record.workload_id, session.donor_id, record.epoch, lease_until
                )
                self._note_guest_state(record, guest)
            elif self._fencing.arriving(session, guest):
                pass  # the move's own results decide (the target's report can beat them)
            elif guest.state is link.GuestState.STOPPED:
                self._fencing.clean_stopped_copy(session, record, guest)
            else:
                self._fencing.start_fence(session, guest)
        session.send(link.Ack(event_seq=seq, lease_until=lease_until))
        if had_room:
            state.wake_placement.set()

    def _account_idle(self, session: DonorSession, capacity: link.Capacity, now: datetime) -> None:
        if session.last_report_at is None:
            return
        seconds = (now - session.last_report_at).total_seconds()
        if not 0 < seconds <= 2 * self._state.config.report_interval.total_seconds():
            return  # a gap: the donor was away, not idle
        sums = self._idle.setdefault((session.donor_id, hour_of_week(now)), [0.0, 0.0])
        sums[0] += seconds
        if capacity.idle:
            sums[1] += seconds

    def _note_guest_state(self, record: WorkloadRecord, guest: link.GuestReport) -> None:
        state = self._state
        if guest.state is link.GuestState.RUNNING:
            state.running_since.setdefault((record.workload_id, record.epoch), state.clock())
        if record.state is WorkloadState.EVACUATING and guest.state is not link.GuestState.FAILED:
            return  # a move is under way: its commands' results decide the next state
        if guest.state is link.GuestState.FAILED:
            new_state = WorkloadState.FAILED
        else:
            mapped = REPORTED.get(guest.state)
            if mapped is None:
                return
            new_state = mapped
        if new_state is not record.state:
            state.spawn(
                self._change_state(record.workload_id, record.epoch, new_state, guest.detail)
            )

    async def _change_state(
        self, workload_id: str, epoch: int, new_state: WorkloadState, detail: str
    ) -> None:
        state = self._state
        async with state.lock:
            record = state.workloads.get(workload_id)
            if record is None or record.epoch != epoch or record.state is new_state:
                return
            now = state.clock()
            event = WorkloadEvent(workload_id, now, new_state.value, record.donor_id, epoch, detail)
            await state.write(record, event=event, state=new_state, detail=detail)

    async def flush(self) -> None:
        """Write the batched reports: last seen, leases, idle history."""
        state = self._state
        seen, self._seen = self._seen, {}
        renewals, self._renewals = self._renewals, {}
        idle, self._idle = self._idle, {}
        if seen:
            await state.io(state.store.record_seen, list(seen.values()))
            for item in seen.values():
                donor = state.donors.get(item.donor_id)
                if donor is not None:
                    state.donors[item.donor_id] = replace(
                        donor, last_seen=item.last_seen, capacity=item.capacity, lost=False
                    )
        if renewals:
            await state.io(state.store.renew_leases, list(renewals.values()))
        if idle:
            await state.io(
                state.store.add_idle_samples,
                [IdleSample(d, h, sums[0], sums[1]) for (d, h), sums in idle.items()],
            )
