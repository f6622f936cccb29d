"""The Admin API's replies → domain types, for the admin client.

The coordinator checked everything it stored, so these readers take its fields as they
come (an unset capacity or time becomes None); a reply that still cannot be a domain
value raises `ValueError` naming the field (the client reports it as a bad reply). The
coordinator's side, domain → wire, is `donor_app.proto.admin_serde`.
"""

from __future__ import annotations

from datetime import UTC, datetime

from google.protobuf.timestamp_pb2 import Timestamp

from donor_app.domain import link
from donor_app.domain.admin_views import DonorView, IssuedToken
from donor_app.domain.records import WorkloadEvent, WorkloadRecord, WorkloadState
from donor_app.proto.spec_serde import spec_from_proto
from donor_app.proto.v1 import coordinator_pb2 as pb

_WORKLOAD_STATES = {
    pb.WORKLOAD_STATE_QUEUED: WorkloadState.QUEUED,
    pb.WORKLOAD_STATE_ASSIGNED: WorkloadState.ASSIGNED,
    pb.WORKLOAD_STATE_RUNNING: WorkloadState.RUNNING,
    pb.WORKLOAD_STATE_PAUSED: WorkloadState.PAUSED,
    pb.WORKLOAD_STATE_EVACUATING: WorkloadState.EVACUATING,
    pb.WORKLOAD_STATE_CHECKPOINTED: WorkloadState.CHECKPOINTED,
    pb.WORKLOAD_STATE_CANCELLED: WorkloadState.CANCELLED,
    pb.WORKLOAD_STATE_FAILED: WorkloadState.FAILED,
}


def _moment(stamp: Timestamp) -> datetime:
    return stamp.ToDatetime(tzinfo=UTC)


def _optional_moment(message: object, name: str) -> datetime | None:
    if message.HasField(name):  # type: ignore[attr-defined]
        return _moment(getattr(message, name))
    return None


def issued_token_from_proto(message: pb.CreateTokenResponse) -> IssuedToken:
    return IssuedToken(
        token=message.token, expires_at=_moment(message.expires_at), uses=message.uses
    )


def workload_from_proto(message: pb.Workload) -> WorkloadRecord:
    """A workload as the coordinator reports it. `ValueError` naming the field for a
    state or spec that cannot be one."""
    try:
        state = _WORKLOAD_STATES[message.state]
    except KeyError:
        raise ValueError(f"state: {message.state} is not a known workload state") from None
    spec, priority = spec_from_proto(message.spec)
    checkpoint = None
    if message.HasField("checkpoint"):
        saved = message.checkpoint
        checkpoint = link.CheckpointInfo(
            sha256=saved.sha256,
            size=saved.size,
            epoch=saved.epoch,
            taken_at=_moment(saved.taken_at),
            donor_id=saved.donor_id,
        )
    return WorkloadRecord(
        workload_id=message.id,
        spec=spec,
        priority=priority,
        state=state,
        created_at=_moment(message.created_at),
        updated_at=_moment(message.updated_at),
        donor_id=message.donor_id or None,
        epoch=message.epoch,
        lease_until=_optional_moment(message, "lease_until"),
        detail=message.detail,
        checkpoint=checkpoint,
    )


def workload_event_from_proto(message: pb.WorkloadEvent, workload_id: str) -> WorkloadEvent:
    return WorkloadEvent(
        workload_id=workload_id,
        at=_moment(message.at),
        kind=message.kind,
        donor_id=message.donor_id or None,
        epoch=message.epoch,
        detail=message.detail,
    )


def history_from_proto(
    message: pb.WorkloadHistoryResponse,
) -> tuple[WorkloadRecord, tuple[WorkloadEvent, ...]]:
    """A workload and its events, oldest first."""
    workload = workload_from_proto(message.workload)
    events = tuple(workload_event_from_proto(e, workload.workload_id) for e in message.events)
    return workload, events


def donor_view_from_proto(message: pb.Donor) -> DonorView:
    capacity = None
    if message.HasField("capacity"):
        wire = message.capacity
        capacity = link.Capacity(
            cores=wire.cores,
            memory_mib=wire.memory_mib,
            arch=wire.arch,
            lend_cpu_percent=wire.lend_cpu_percent,
            lend_memory_mib=wire.lend_memory_mib,
            lend_until=_optional_moment(wire, "lend_until"),
            idle=wire.idle,
        )
    return DonorView(
        donor_id=message.id,
        hostname=message.hostname,
        connected=message.connected,
        drained=message.drained,
        revoked=message.revoked,
        lost=message.lost,
        capacity=capacity,
        enrolled_at=_optional_moment(message, "enrolled_at"),
        last_seen=_optional_moment(message, "last_seen"),
        workload_ids=tuple(message.workload_ids),
    )
