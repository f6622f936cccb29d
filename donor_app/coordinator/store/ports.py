"""The fleet store's port: everything the coordinator keeps across restarts.

Implemented by `SqlStore` (SQLAlchemy Core over SQLite or PostgreSQL); one contract
suite (tests/integration/test_store_contract.py) runs against both databases.

Every method is one transaction: it completes or changes nothing. Methods block (they
do I/O); the asyncio server calls them through a worker thread. They are safe to call
from several threads at once.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Protocol

from donor_app.domain.records import (
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


class StoreError(Exception):
    """The database failed or refused (not a caller's mistake)."""


class TokenRefused(Exception):
    """An enrollment token cannot be used; `reason` is one of "unknown", "expired",
    "used" (no uses left)."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"enrollment token refused: {reason}")
        self.reason = reason


class Conflict(Exception):
    """A compare-and-set lost: the record changed (e.g. its epoch moved on)."""


class Store(Protocol):
    # --- enrollment tokens ------------------------------------------------------------
    def add_token(self, token: TokenRecord) -> None: ...

    def use_token(self, token_id: str, secret_sha256: str, now: datetime) -> TokenRecord:
        """Take one use of a token atomically (two enrollments racing for a single-use
        token: exactly one wins). Raises TokenRefused; a refused token is unchanged.
        Compares the hash in constant time."""
        ...

    # --- donors -----------------------------------------------------------------------
    def add_donor(self, donor: DonorRecord) -> None: ...

    def get_donor(self, donor_id: str) -> DonorRecord | None: ...

    def list_donors(self) -> list[DonorRecord]: ...

    def set_donor_flags(
        self,
        donor_id: str,
        *,
        drained: bool | None = None,
        revoked: bool | None = None,
        lost: bool | None = None,
    ) -> DonorRecord:
        """Change the given flags (None: leave). KeyError for an unknown donor."""
        ...

    def record_seen(self, seen: Sequence[DonorSeen]) -> None:
        """Batch: last_seen and capacity of many donors in one transaction; clears
        `lost`. Unknown donor ids are ignored."""
        ...

    # --- workloads --------------------------------------------------------------------
    def add_workload(self, workload: WorkloadRecord, event: WorkloadEvent) -> None:
        """Stores every field, `checkpoint` included, and appends `event`."""
        ...

    def get_workload(self, workload_id: str) -> WorkloadRecord | None:
        """Every method returning a WorkloadRecord fills its `checkpoint` (None when
        the workload has none)."""
        ...

    def list_workloads(
        self, states: Iterable[WorkloadState] | None = None, donor_id: str | None = None
    ) -> list[WorkloadRecord]:
        """Ordered by priority (highest first), then created_at."""
        ...

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
        """Compare-and-set on the epoch: raises Conflict when the stored epoch is not
        `expected_epoch`, KeyError for an unknown id. Sets updated_at = now and appends
        `event` in the same transaction. Returns the new record.

        `checkpoint` replaces the workload's latest checkpoint, `clear_checkpoint`
        forgets it (ValueError for both at once); neither leaves it as it is. A lost
        compare-and-set leaves the stored checkpoint unchanged."""
        ...

    def renew_leases(self, renewals: Sequence[LeaseRenewal]) -> int:
        """Batch: extend leases whose (donor_id, epoch) still match; returns how many
        matched. Stale renewals are ignored (the fleet logic fences them)."""
        ...

    def expired_leases(self, now: datetime) -> list[WorkloadRecord]:
        """Workloads in a held state whose lease ended before `now`."""
        ...

    def workload_events(self, workload_id: str) -> list[WorkloadEvent]:
        """Oldest first."""
        ...

    # --- images -----------------------------------------------------------------------
    def add_image(self, image: ImageRecord) -> None:
        """Idempotent: adding a known sha256 again changes nothing."""
        ...

    def get_image(self, sha256: str) -> ImageRecord | None: ...

    # --- idle history (placement prefers donors likely to stay idle) -------------------
    def add_idle_samples(self, samples: Sequence[IdleSample]) -> None:
        """Batch: adds to the per (donor, hour_of_week) sums."""
        ...

    def idle_ratios(self, donor_ids: Iterable[str], hour_of_week: int) -> dict[str, float]:
        """idle_seconds / seen_seconds per donor for that hour; donors never seen in
        that hour are absent."""
        ...

    def close(self) -> None: ...
