"""Placement: which connected donors have room (offers), and assigning queued workloads
to them. The choice itself is pure (`donor_app.domain.placement`); this module gathers
its inputs from the sessions and writes its result.

Runs on the coordinator's loop: `place_queued` from the placement task (woken by a new
or requeued workload or a donor with new room, else once a `placement_interval`), under
the fleet lock.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from datetime import datetime

from donor_app.coordinator.fleet.config import RECLAIMING_LEVELS, run_command
from donor_app.coordinator.fleet.state import FleetState, demand
from donor_app.domain.placement import Offer, hour_of_week, offer_from_capacity, place
from donor_app.domain.records import WorkloadEvent, WorkloadState

log = logging.getLogger(__name__)


class Placement:
    def __init__(self, state: FleetState) -> None:
        self._state = state
        # Per donor: how often it was idle in the current hour of the week (store).
        self._idle_ratios: dict[str, float] = {}
        self._idle_ratios_hour = -1

    def offers(self, exclude: Iterable[str] = ()) -> list[Offer]:
        """What each connected donor can take now, but those excluded, drained, revoked
        or handing their guests back."""
        excluded = set(exclude)
        offers = []
        for donor_id, session in self._state.sessions.items():
            donor = self._state.donors.get(donor_id)
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
                    held=[demand(w) for w in self._state.held_by(donor_id)],
                    lend_until=capacity.lend_until,
                    idle_ratio=self._idle_ratios.get(donor_id),
                )
            )
        return offers

    async def _refresh_idle_ratios(self, now: datetime) -> None:
        hour = hour_of_week(now)
        if hour != self._idle_ratios_hour:
            self._idle_ratios = await self._state.io(
                self._state.store.idle_ratios, list(self._state.sessions), hour
            )
            self._idle_ratios_hour = hour

    async def place_queued(self) -> int:
        """Assign queued workloads to donors with room; returns how many were placed."""
        state = self._state
        async with state.lock:
            # A workload some donor just reported is being checked (it may be re-adopted
            # by its last donor): not placed until that check is done.
            checking = {w for session in state.sessions.values() for w in session.fencing}
            queued = sorted(
                (
                    w
                    for w in state.workloads.values()
                    if w.state is WorkloadState.QUEUED and w.workload_id not in checking
                ),
                key=lambda w: w.created_at,
            )
            if not queued or not state.sessions:
                return 0
            now = state.clock()
            await self._refresh_idle_ratios(now)
            choices = place([demand(w) for w in queued], self.offers())
            placed = 0
            for record in queued:
                donor_id = choices.get(record.workload_id)
                session = state.sessions.get(donor_id) if donor_id else None
                if donor_id is None or session is None:
                    continue
                epoch = await state.next_epoch(record)
                updated = await state.write(
                    record,
                    event=WorkloadEvent(record.workload_id, now, "placed", donor_id, epoch),
                    state=WorkloadState.ASSIGNED,
                    donor_id=donor_id,
                    epoch=epoch,
                    lease_until=now + state.config.lease_ttl,
                    detail="",
                )
                if updated is not None:
                    session.send(run_command(updated))
                    placed += 1
                    log.info(
                        "placed %s on donor %s (epoch %d)", record.workload_id, donor_id, epoch
                    )
            return placed
