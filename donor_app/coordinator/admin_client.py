"""The Admin API's client in domain types (used by the `donor-coordinator` subcommands).

Talks to the main port with the admin credential (mTLS) through `AdminRpc`, and turns
its replies into `WorkloadRecord`, `WorkloadEvent`, `DonorView` and `IssuedToken`.
Every failure is an `AdminError` with one line to print: the coordinator's refusal, an
unreachable coordinator, or a reply that is not a domain value.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import grpc

from donor_app.coordinator.admin_rpc import AdminCredential, AdminError, AdminRpc
from donor_app.domain.admin_views import DonorView, IssuedToken
from donor_app.domain.records import WorkloadEvent, WorkloadRecord
from donor_app.domain.vm import VmSpec
from donor_app.proto import admin_replies
from donor_app.proto.spec_serde import spec_to_proto

__all__ = ["AdminClient", "AdminCredential", "AdminError"]

_Wire = TypeVar("_Wire")
_Domain = TypeVar("_Domain")


def _read(convert: Callable[[_Wire], _Domain], reply: _Wire) -> _Domain:
    try:
        return convert(reply)
    except ValueError as error:
        raise AdminError(
            grpc.StatusCode.INTERNAL, f"the coordinator's reply is not understood: {error}"
        ) from None


class AdminClient:
    """One channel to the coordinator's Admin API; thread-safe, as gRPC channels are."""

    def __init__(self, address: str, credential: AdminCredential, timeout_s: float = 30.0) -> None:
        self.address = address
        self._rpc = AdminRpc(address, credential, timeout_s)

    def close(self) -> None:
        self._rpc.close()

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def create_token(self, ttl_s: int, uses: int, note: str = "") -> IssuedToken:
        """A new enrollment token (`ttl_s` 0: one hour; `uses` 0: one)."""
        return _read(
            admin_replies.issued_token_from_proto, self._rpc.create_token(ttl_s, uses, note)
        )

    def upload_image(self, path: Path) -> str:
        """Upload a file; returns its sha256 (uploading a known image again is harmless)."""
        return self._rpc.upload_image(path)

    def submit(self, spec: VmSpec, priority: int = 0) -> WorkloadRecord:
        """Queue a workload; its images must have been uploaded."""
        return _read(
            admin_replies.workload_from_proto, self._rpc.submit(spec_to_proto(spec, priority))
        )

    def workloads(self) -> list[WorkloadRecord]:
        """Every workload the coordinator knows, where it runs."""
        return [_read(admin_replies.workload_from_proto, w) for w in self._rpc.workloads()]

    def cancel(self, workload_id: str) -> WorkloadRecord:
        """Stop a workload everywhere."""
        return _read(admin_replies.workload_from_proto, self._rpc.cancel(workload_id))

    def history(self, workload_id: str) -> tuple[WorkloadRecord, tuple[WorkloadEvent, ...]]:
        """A workload and its events (placed, moved, checkpointed…), oldest first."""
        return _read(admin_replies.history_from_proto, self._rpc.history(workload_id))

    def move(self, workload_id: str, target: str = "", cold: bool = False) -> WorkloadRecord:
        """Move a workload to `target` (empty: the best idle donor), live unless `cold`."""
        return _read(admin_replies.workload_from_proto, self._rpc.move(workload_id, target, cold))

    def donors(self) -> list[DonorView]:
        """Every enrolled donor."""
        return [_read(admin_replies.donor_view_from_proto, d) for d in self._rpc.donors()]

    def drain(self, donor_id: str) -> DonorView:
        """No new work for the donor; its work moves away."""
        return _read(admin_replies.donor_view_from_proto, self._rpc.drain(donor_id))

    def revoke(self, donor_id: str) -> DonorView:
        """Refuse the donor from now on."""
        return _read(admin_replies.donor_view_from_proto, self._rpc.revoke(donor_id))
