"""Leases: a workload whose donor stopped renewing it is requeued, and a donor silent
for a lease's length is marked lost.

A donor renews the leases of what it holds with every report (reports.py); one that
cannot renew for `lease_ttl` pauses its guests itself. Only after the lease has ended
does the coordinator place the workload again, at a newer epoch, so no two copies ever
run: the old donor's copy is fenced if it comes back (fencing.py).

Runs on the coordinator's loop, from the sweep task once a second; takes the fleet lock
to requeue.
"""

from __future__ import annotations

import logging
from datetime import datetime

from donor_app.coordinator.fleet.state import FleetState
from donor_app.domain.records import HELD_STATES

log = logging.getLogger(__name__)


class Leases:
    def __init__(self, state: FleetState) -> None:
        self._state = state

    async def requeue_expired(self, now: datetime) -> None:
        """Requeue every held workload whose lease ended before `now`."""
        state = self._state
        expired = [
            w
            for w in state.workloads.values()
            if w.state in HELD_STATES and w.lease_until is not None and w.lease_until < now
        ]
        if not expired:
            return
        async with state.lock:
            for record in expired:
                current = state.workloads.get(record.workload_id)
                if current is None or current.lease_until is None or current.lease_until >= now:
                    continue
                state.moves.pop(current.workload_id, None)
                await state.requeue(current, f"lease expired on donor {current.donor_id}")

    async def mark_lost(self, now: datetime) -> None:
        """Donors neither connected nor seen for a lease's length are lost."""
        state = self._state
        silent_after = now - state.config.lease_ttl
        for donor in list(state.donors.values()):
            if (
                not donor.lost
                and donor.donor_id not in state.sessions
                and donor.last_seen is not None
                and donor.last_seen < silent_after
            ):
                state.donors[donor.donor_id] = await state.io(
                    state.store.set_donor_flags, donor.donor_id, lost=True
                )
                log.warning("donor %s is lost (silent since %s)", donor.donor_id, donor.last_seen)
