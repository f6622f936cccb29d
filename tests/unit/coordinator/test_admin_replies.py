"""The admin client's reading of the Admin API's replies: what the coordinator writes
(`admin_serde`) reads back as the same domain values."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from donor_app.domain import link
from donor_app.domain.records import DonorRecord, WorkloadEvent, WorkloadRecord, WorkloadState
from donor_app.domain.vm import DiskBoot, KernelBoot, VmSpec
from donor_app.proto import admin_replies, admin_serde
from donor_app.proto.v1 import coordinator_pb2 as pb

T0 = datetime(2026, 1, 5, 9, 30, 1, 250_000, tzinfo=UTC)
CAP = link.Capacity(8, 16384, "x86_64", 25.0, 4096, T0 + timedelta(hours=8), True)
CHECKPOINT = link.CheckpointInfo("c" * 64, 123_456, 3, T0, "d-0")


@pytest.mark.parametrize(
    "record",
    [
        WorkloadRecord(
            workload_id="w-1",
            spec=VmSpec("job-1", 2, 512, KernelBoot("a" * 64, "b" * 64, "console=ttyS0 quiet")),
            priority=-5,
            state=WorkloadState.RUNNING,
            created_at=T0,
            updated_at=T0 + timedelta(seconds=3),
            donor_id="d-1",
            epoch=4,
            lease_until=T0 + timedelta(seconds=30),
            detail="running since 09:30",
            checkpoint=CHECKPOINT,
        ),
        WorkloadRecord(
            workload_id="w-2",
            spec=VmSpec("disk-job", 1, 256, DiskBoot("d" * 64), network=True, arch="aarch64"),
            priority=0,
            state=WorkloadState.QUEUED,
            created_at=T0,
            updated_at=T0,
        ),
    ],
)
def test_a_workload_reads_back_as_written(record: WorkloadRecord) -> None:
    assert admin_replies.workload_from_proto(admin_serde.workload_to_proto(record)) == record


def test_every_workload_state_reads_back() -> None:
    base = WorkloadRecord(
        "w-1", VmSpec("j", 1, 256, DiskBoot("d" * 64)), 0, WorkloadState.QUEUED, T0, T0
    )
    for state in WorkloadState:
        wire = admin_serde.workload_to_proto(replace(base, state=state))
        assert admin_replies.workload_from_proto(wire).state is state


def test_an_unknown_state_or_spec_names_the_field() -> None:
    record = WorkloadRecord(
        "w-1", VmSpec("j", 1, 256, DiskBoot("d" * 64)), 0, WorkloadState.QUEUED, T0, T0
    )
    wire = admin_serde.workload_to_proto(record)
    wire.state = pb.WORKLOAD_STATE_UNSPECIFIED
    with pytest.raises(ValueError, match="^state: "):
        admin_replies.workload_from_proto(wire)
    wire = admin_serde.workload_to_proto(record)
    wire.spec.vcpus = 0
    with pytest.raises(ValueError, match="^spec.vcpus: "):
        admin_replies.workload_from_proto(wire)


def test_a_history_reads_back_with_its_workload_id() -> None:
    record = WorkloadRecord(
        "w-9", VmSpec("j", 1, 256, DiskBoot("d" * 64)), 0, WorkloadState.PAUSED, T0, T0
    )
    events = (
        WorkloadEvent("w-9", T0, "placed", "d-1", 1, "best idle donor"),
        WorkloadEvent("w-9", T0 + timedelta(minutes=1), "requeued", None, 2),
    )
    wire = pb.WorkloadHistoryResponse(
        workload=admin_serde.workload_to_proto(record),
        events=[admin_serde.workload_event_to_proto(e) for e in events],
    )
    assert admin_replies.history_from_proto(wire) == (record, events)


def test_a_donor_reads_back_with_its_connection_and_workloads() -> None:
    donor = DonorRecord("d-1", "desk-7", "f" * 64, T0, CAP, T0 + timedelta(seconds=5), drained=True)
    view = admin_replies.donor_view_from_proto(
        admin_serde.donor_to_proto(donor, connected=True, workload_ids=["w-1", "w-2"])
    )
    assert (view.donor_id, view.hostname, view.connected) == ("d-1", "desk-7", True)
    assert (view.drained, view.revoked, view.lost, view.flags) == (True, False, False, ("drained",))
    assert (view.capacity, view.enrolled_at, view.last_seen) == (CAP, T0, T0 + timedelta(seconds=5))
    assert view.workload_ids == ("w-1", "w-2")


def test_a_donor_that_never_reported_has_no_capacity() -> None:
    donor = DonorRecord("d-2", "desk-8", "f" * 64, T0, revoked=True, lost=True)
    view = admin_replies.donor_view_from_proto(
        admin_serde.donor_to_proto(donor, connected=False, workload_ids=[])
    )
    assert (view.capacity, view.last_seen, view.workload_ids) == (None, None, ())
    assert view.flags == ("revoked", "lost")


def test_a_new_token_keeps_its_secret_out_of_repr() -> None:
    wire = pb.CreateTokenResponse(token="dtk_0123_secret", uses=3)
    wire.expires_at.FromDatetime(T0.replace(microsecond=0))
    token = admin_replies.issued_token_from_proto(wire)
    assert (token.token, token.expires_at, token.uses) == (
        "dtk_0123_secret",
        T0.replace(microsecond=0),
        3,
    )
    assert "secret" not in repr(token)
