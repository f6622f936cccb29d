"""The admin API's views (workloads, their events, donors) ↔ coordinator.proto.

Mostly outbound; `workload_state_from_proto` reads a state a request names.
"""

from __future__ import annotations

from collections.abc import Sequence

from donor_app.domain.records import DonorRecord, WorkloadEvent, WorkloadRecord, WorkloadState
from donor_app.proto.checks import WireError
from donor_app.proto.coordinator_serde import capacity_to_proto, checkpoint_to_proto
from donor_app.proto.serde import timestamp
from donor_app.proto.spec_serde import spec_to_proto
from donor_app.proto.v1 import coordinator_pb2 as pb

_WORKLOAD_STATES = {
    WorkloadState.QUEUED: pb.WORKLOAD_STATE_QUEUED,
    WorkloadState.ASSIGNED: pb.WORKLOAD_STATE_ASSIGNED,
    WorkloadState.RUNNING: pb.WORKLOAD_STATE_RUNNING,
    WorkloadState.PAUSED: pb.WORKLOAD_STATE_PAUSED,
    WorkloadState.EVACUATING: pb.WORKLOAD_STATE_EVACUATING,
    WorkloadState.CHECKPOINTED: pb.WORKLOAD_STATE_CHECKPOINTED,
    WorkloadState.CANCELLED: pb.WORKLOAD_STATE_CANCELLED,
    WorkloadState.FAILED: pb.WORKLOAD_STATE_FAILED,
}
_WORKLOAD_STATES_BACK = {wire: state for state, wire in _WORKLOAD_STATES.items()}


def workload_state_from_proto(wire: pb.WorkloadState.ValueType) -> WorkloadState:
    try:
        return _WORKLOAD_STATES_BACK[wire]
    except KeyError:
        raise WireError(f"state: {wire} is not a known workload state") from None


def workload_to_proto(record: WorkloadRecord) -> pb.Workload:
    message = pb.Workload(
        id=record.workload_id,
        spec=spec_to_proto(record.spec, record.priority),
        state=_WORKLOAD_STATES[record.state],
        donor_id=record.donor_id or "",
        epoch=record.epoch,
        created_at=timestamp(record.created_at),
        updated_at=timestamp(record.updated_at),
        detail=record.detail,
    )
    if record.lease_until is not None:
        message.lease_until.CopyFrom(timestamp(record.lease_until))
    if record.checkpoint is not None:
        message.checkpoint.CopyFrom(checkpoint_to_proto(record.checkpoint))
    return message


def workload_event_to_proto(event: WorkloadEvent) -> pb.WorkloadEvent:
    return pb.WorkloadEvent(
        at=timestamp(event.at),
        kind=event.kind,
        donor_id=event.donor_id or "",
        epoch=event.epoch,
        detail=event.detail,
    )


def donor_to_proto(
    record: DonorRecord, *, connected: bool, workload_ids: Sequence[str]
) -> pb.Donor:
    message = pb.Donor(
        id=record.donor_id,
        hostname=record.hostname,
        connected=connected,
        drained=record.drained,
        revoked=record.revoked,
        lost=record.lost,
        enrolled_at=timestamp(record.enrolled_at),
        workload_ids=list(workload_ids),
    )
    if record.capacity is not None:
        message.capacity.CopyFrom(capacity_to_proto(record.capacity))
    if record.last_seen is not None:
        message.last_seen.CopyFrom(timestamp(record.last_seen))
    return message
