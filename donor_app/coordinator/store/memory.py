"""The fleet store in memory: for unit tests of the fleet logic and as a reference of the
port's contract; nothing survives the process.

`InMemoryStore` keeps plain dicts and lists under one lock. It behaves as `SqlStore`
does, errors included: AlreadyExists for a known key, Conflict for a lost
compare-and-set, KeyError for an unknown id, TokenRefused, StoreError where a database
would refuse the change (a workload on a donor that is not enrolled), ValueError for a
naive datetime or inconsistent arguments. Times come back in UTC, as the databases give
them. The records are frozen dataclasses, so the store hands out the ones it keeps.
"""

from __future__ import annotations

import hmac
import re
import threading
from collections.abc import Iterable, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from donor_app.coordinator.store.ports import AlreadyExists, Conflict, StoreError, TokenRefused
from donor_app.domain.records import (
    HELD_STATES,
    Capacity,
    CheckpointRef,
    DonorRecord,
    DonorSeen,
    IdleSample,
    ImageRecord,
    LeaseRenewal,
    TokenRecord,
    WorkloadEvent,
    WorkloadRecord,
    WorkloadState,
)

if TYPE_CHECKING:
    from donor_app.coordinator.store.ports import Store

HOURS_PER_WEEK = 168
# The databases keep ids in 64 characters; a checkpoint's donor id is checked for it.
_MAX_ID = 64
_SHA256 = re.compile(r"[0-9a-f]{64}")


# --- checks and normal forms ------------------------------------------------------------


def _utc(name: str, value: datetime) -> datetime:
    """`value` in UTC; ValueError for a naive datetime."""
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{name}: naive datetime {value!r}: the store keeps aware UTC times")
    return value.astimezone(UTC)


def _utc_or_none(name: str, value: datetime | None) -> datetime | None:
    return None if value is None else _utc(name, value)


def _capacity(capacity: Capacity | None) -> Capacity | None:
    if capacity is None:
        return None
    return replace(
        capacity,
        lend_cpu_percent=float(capacity.lend_cpu_percent),
        lend_until=_utc_or_none("capacity.lend_until", capacity.lend_until),
        idle=bool(capacity.idle),
    )


def _checkpoint(checkpoint: CheckpointRef | None) -> CheckpointRef | None:
    """The checkpoint as stored; ValueError for one a database would not give back as
    it was given."""
    if checkpoint is None:
        return None
    if not _SHA256.fullmatch(checkpoint.sha256):
        raise ValueError(f"checkpoint.sha256: {checkpoint.sha256!r} is not 64 lowercase hex")
    if not 0 < len(checkpoint.donor_id) <= _MAX_ID:
        raise ValueError(f"checkpoint.donor_id: {checkpoint.donor_id!r} is not 1–64 characters")
    if checkpoint.size < 0 or checkpoint.epoch < 0:
        raise ValueError(f"checkpoint {checkpoint.sha256}: negative size or epoch")
    return replace(checkpoint, taken_at=_utc("checkpoint.taken_at", checkpoint.taken_at))


def _event(event: WorkloadEvent) -> WorkloadEvent:
    return replace(event, at=_utc("event.at", event.at))


# --- the store --------------------------------------------------------------------------


class InMemoryStore:
    """The fleet store in a process's memory (see `ports.Store` for the contract of each
    method, `SqlStore` for the details this one shares with it).

    Thread-safe: one lock around every method. A method checks its arguments before it
    changes anything and raises before its first change, so it completes or changes
    nothing.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tokens: dict[str, TokenRecord] = {}
        self._donors: dict[str, DonorRecord] = {}
        self._workloads: dict[str, WorkloadRecord] = {}
        self._events: dict[str, list[WorkloadEvent]] = {}  # per workload, as added
        self._images: dict[str, ImageRecord] = {}
        # (donor_id, hour_of_week) -> (seen_seconds, idle_seconds)
        self._idle: dict[tuple[str, int], tuple[float, float]] = {}

    # --- enrollment tokens ------------------------------------------------------------

    def add_token(self, token: TokenRecord) -> None:
        stored = replace(
            token,
            created_at=_utc("created_at", token.created_at),
            expires_at=_utc("expires_at", token.expires_at),
        )
        with self._lock:
            if token.token_id in self._tokens:
                raise AlreadyExists(f"token {token.token_id} exists")
            self._tokens[token.token_id] = stored

    def use_token(self, token_id: str, secret_sha256: str, now: datetime) -> TokenRecord:
        """Returns the token as it is after this use (uses_left already decremented).
        A wrong secret is refused as "unknown", as an unknown id is."""
        now = _utc("now", now)
        with self._lock:
            stored = self._tokens.get(token_id)
            if stored is None or not hmac.compare_digest(
                stored.secret_sha256.encode(), secret_sha256.encode()
            ):
                raise TokenRefused("unknown")
            if stored.expires_at <= now:
                raise TokenRefused("expired")
            if stored.uses_left <= 0:
                raise TokenRefused("used")
            used = replace(stored, uses_left=stored.uses_left - 1)
            self._tokens[token_id] = used
            return used

    # --- donors -----------------------------------------------------------------------

    def add_donor(self, donor: DonorRecord) -> None:
        stored = replace(
            donor,
            enrolled_at=_utc("enrolled_at", donor.enrolled_at),
            last_seen=_utc_or_none("last_seen", donor.last_seen),
            capacity=_capacity(donor.capacity),
            drained=bool(donor.drained),
            revoked=bool(donor.revoked),
            lost=bool(donor.lost),
        )
        with self._lock:
            if donor.donor_id in self._donors:
                raise AlreadyExists(f"donor {donor.donor_id} exists")
            self._donors[donor.donor_id] = stored

    def get_donor(self, donor_id: str) -> DonorRecord | None:
        with self._lock:
            return self._donors.get(donor_id)

    def list_donors(self) -> list[DonorRecord]:
        """Ordered by enrollment time, then id."""
        with self._lock:
            found = list(self._donors.values())
        return sorted(found, key=lambda d: (d.enrolled_at, d.donor_id))

    def set_donor_flags(
        self,
        donor_id: str,
        *,
        drained: bool | None = None,
        revoked: bool | None = None,
        lost: bool | None = None,
    ) -> DonorRecord:
        with self._lock:
            stored = self._donors.get(donor_id)
            if stored is None:
                raise KeyError(donor_id)
            changed = replace(
                stored,
                drained=stored.drained if drained is None else bool(drained),
                revoked=stored.revoked if revoked is None else bool(revoked),
                lost=stored.lost if lost is None else bool(lost),
            )
            self._donors[donor_id] = changed
            return changed

    def record_seen(self, seen: Sequence[DonorSeen]) -> None:
        """A donor listed twice ends with its last report."""
        reports = [
            (item.donor_id, _utc("last_seen", item.last_seen), _capacity(item.capacity))
            for item in seen
        ]
        with self._lock:
            for donor_id, last_seen, capacity in reports:
                stored = self._donors.get(donor_id)
                if stored is not None:
                    self._donors[donor_id] = replace(
                        stored, last_seen=last_seen, capacity=capacity, lost=False
                    )

    # --- workloads --------------------------------------------------------------------

    def add_workload(self, workload: WorkloadRecord, event: WorkloadEvent) -> None:
        if event.workload_id != workload.workload_id:
            raise ValueError(
                f"event.workload_id {event.workload_id!r} is not {workload.workload_id!r}"
            )
        stored = replace(
            workload,
            state=WorkloadState(workload.state),
            created_at=_utc("created_at", workload.created_at),
            updated_at=_utc("updated_at", workload.updated_at),
            lease_until=_utc_or_none("lease_until", workload.lease_until),
            checkpoint=_checkpoint(workload.checkpoint),
        )
        first = _event(event)
        with self._lock:
            if workload.workload_id in self._workloads:
                raise AlreadyExists(f"workload {workload.workload_id} exists")
            self._require_donor(workload.workload_id, workload.donor_id)
            self._workloads[workload.workload_id] = stored
            self._events[workload.workload_id] = [first]

    def get_workload(self, workload_id: str) -> WorkloadRecord | None:
        with self._lock:
            return self._workloads.get(workload_id)

    def list_workloads(
        self, states: Iterable[WorkloadState] | None = None, donor_id: str | None = None
    ) -> list[WorkloadRecord]:
        """Ordered by priority (highest first), then created_at, then id. An empty
        `states` matches nothing."""
        wanted = None if states is None else {WorkloadState(s) for s in states}
        with self._lock:
            found = [
                w
                for w in self._workloads.values()
                if (wanted is None or w.state in wanted)
                and (donor_id is None or w.donor_id == donor_id)
            ]
        return sorted(found, key=lambda w: (-w.priority, w.created_at, w.workload_id))

    def update_workload(
        self,
        workload_id: str,
        *,
        expected_epoch: int,
        event: WorkloadEvent | None = None,
        state: WorkloadState | None = None,
        donor_id: str | None = None,
        clear_donor: bool = False,
        epoch: int | None = None,
        lease_until: datetime | None = None,
        detail: str | None = None,
        checkpoint: CheckpointRef | None = None,
        clear_checkpoint: bool = False,
        now: datetime,
    ) -> WorkloadRecord:
        """See the port. `clear_donor` also clears `lease_until` (so a lease cannot be
        set in the same call); a donor that is not enrolled is refused (StoreError)."""
        if clear_donor and donor_id is not None:
            raise ValueError("donor_id and clear_donor are exclusive")
        if clear_checkpoint and checkpoint is not None:
            raise ValueError("checkpoint and clear_checkpoint are exclusive")
        if clear_donor and lease_until is not None:
            raise ValueError("lease_until and clear_donor are exclusive")
        if event is not None and event.workload_id != workload_id:
            raise ValueError(f"event.workload_id {event.workload_id!r} is not {workload_id!r}")
        now = _utc("now", now)
        new_lease = _utc_or_none("lease_until", lease_until)
        new_event = None if event is None else _event(event)
        new_state = None if state is None else WorkloadState(state)
        new_checkpoint = _checkpoint(checkpoint)
        with self._lock:
            stored = self._workloads.get(workload_id)
            if stored is None:
                raise KeyError(workload_id)
            if stored.epoch != expected_epoch:
                raise Conflict(
                    f"workload {workload_id}: epoch is {stored.epoch}, expected {expected_epoch}"
                )
            self._require_donor(workload_id, donor_id)
            kept_lease = None if clear_donor else stored.lease_until
            updated = replace(
                stored,
                state=stored.state if new_state is None else new_state,
                donor_id=None
                if clear_donor
                else (stored.donor_id if donor_id is None else donor_id),
                epoch=stored.epoch if epoch is None else epoch,
                lease_until=kept_lease if new_lease is None else new_lease,
                detail=stored.detail if detail is None else detail,
                checkpoint=(
                    new_checkpoint
                    if checkpoint is not None or clear_checkpoint
                    else stored.checkpoint
                ),
                updated_at=now,
            )
            self._workloads[workload_id] = updated
            if new_event is not None:
                self._events[workload_id].append(new_event)
            return updated

    def renew_leases(self, renewals: Sequence[LeaseRenewal]) -> int:
        """Only workloads in a held state have a lease to extend (see SqlStore); a
        workload renewed twice in one batch counts twice and keeps the last lease."""
        batch = [(item, _utc_or_none("lease_until", item.lease_until)) for item in renewals]
        matched = 0
        with self._lock:
            for item, until in batch:
                stored = self._workloads.get(item.workload_id)
                if (
                    stored is not None
                    and stored.donor_id == item.donor_id
                    and stored.epoch == item.epoch
                    and stored.state in HELD_STATES
                ):
                    self._workloads[item.workload_id] = replace(stored, lease_until=until)
                    matched += 1
        return matched

    def expired_leases(self, now: datetime) -> list[WorkloadRecord]:
        """Oldest lease first."""
        now = _utc("now", now)
        expired: list[tuple[datetime, str, WorkloadRecord]] = []
        with self._lock:
            for w in self._workloads.values():
                if w.state in HELD_STATES and w.lease_until is not None and w.lease_until < now:
                    expired.append((w.lease_until, w.workload_id, w))
        expired.sort(key=lambda item: (item[0], item[1]))
        return [w for _, _, w in expired]

    def workload_events(self, workload_id: str) -> list[WorkloadEvent]:
        """Oldest first by `at`; events with the same time in the order they were
        added."""
        with self._lock:
            events = list(self._events.get(workload_id, ()))
        return sorted(events, key=lambda e: e.at)  # stable: ties keep their order

    def _require_donor(self, workload_id: str, donor_id: str | None) -> None:
        """What the databases' foreign key does: a workload's donor is enrolled."""
        if donor_id is not None and donor_id not in self._donors:
            raise StoreError(
                f"the store refused the change: workload {workload_id} names donor "
                f"{donor_id!r}, which is not enrolled"
            )

    # --- images -----------------------------------------------------------------------

    def add_image(self, image: ImageRecord) -> None:
        stored = replace(image, added_at=_utc("added_at", image.added_at))
        with self._lock:
            self._images.setdefault(image.sha256, stored)

    def get_image(self, sha256: str) -> ImageRecord | None:
        with self._lock:
            return self._images.get(sha256)

    # --- idle history -----------------------------------------------------------------

    def add_idle_samples(self, samples: Sequence[IdleSample]) -> None:
        """Samples of donors the store does not know are kept too. ValueError for an
        hour outside 0–167 or a negative number of seconds."""
        sums: dict[tuple[str, int], tuple[float, float]] = {}
        for sample in samples:
            if not 0 <= sample.hour_of_week < HOURS_PER_WEEK:
                raise ValueError(f"hour_of_week: {sample.hour_of_week} is not in 0–167")
            if sample.seen_seconds < 0 or sample.idle_seconds < 0:
                raise ValueError(f"idle sample of {sample.donor_id}: negative seconds")
            key = (sample.donor_id, sample.hour_of_week)
            seen_s, idle_s = sums.get(key, (0.0, 0.0))
            sums[key] = (seen_s + sample.seen_seconds, idle_s + sample.idle_seconds)
        with self._lock:
            for key, (seen_s, idle_s) in sums.items():
                old_seen, old_idle = self._idle.get(key, (0.0, 0.0))
                self._idle[key] = (old_seen + seen_s, old_idle + idle_s)

    def idle_ratios(self, donor_ids: Iterable[str], hour_of_week: int) -> dict[str, float]:
        ids = sorted(set(donor_ids))
        ratios: dict[str, float] = {}
        with self._lock:
            for donor_id in ids:
                seen_s, idle_s = self._idle.get((donor_id, hour_of_week), (0.0, 0.0))
                if seen_s > 0:
                    ratios[donor_id] = float(idle_s) / float(seen_s)
        return ratios

    def close(self) -> None:
        """Nothing to release; the data stays until the store is dropped."""


if TYPE_CHECKING:

    def _conforms(store: InMemoryStore) -> Store:
        # mypy proves InMemoryStore implements the port.
        return store
