"""The coordinator's side of moves, over the real protocol (mTLS streams, PushCheckpoint,
PullCheckpoint) with test-driven donors: every command and answer is checked exactly.
The same moves with real agents and guests are in tests/e2e/test_migration_e2e.py.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import grpc
import pytest

from donor_app.coordinator.admin_rpc import AdminError
from donor_app.coordinator.admin_rpc import AdminRpc as AdminClient
from donor_app.coordinator.fleet import FleetConfig
from donor_app.domain import link
from donor_app.proto import coordinator_serde as serde
from donor_app.proto.v1 import coordinator_pb2 as pb
from tests.coordinator_helpers import (
    RawDonor,
    RunningCoordinator,
    capacity,
    enroll,
    running_coordinator,
)
from tests.waiting import wait_for

LIMITS = link.MigrationLimits(bandwidth_mibps=0, max_downtime_ms=100, deadline_s=60)
TARGET = link.MigrationTarget(
    "qemu+unix:///system?socket=/tmp/t/libvirt-sock",
    "tcp://127.0.0.1",
    "/cache/kernel",
    "",
    "/state/guests/w/console.log",
)


@pytest.fixture
def coordinator_fleet() -> FleetConfig:
    return FleetConfig(
        lease_ttl=timedelta(seconds=20),
        report_interval=timedelta(seconds=1),
        migration=LIMITS,
        checkpoint_interval=None,
    )


def _donor(coordinator: RunningCoordinator, admin: AdminClient) -> RawDonor:
    donor = RawDonor(
        coordinator.endpoints.address, enroll(coordinator, admin.create_token(60, 1).token)
    )
    donor.hello()
    return donor


def _submit(admin: AdminClient, tmp_path: Path, name: str = "movable") -> pb.Workload:
    image = tmp_path / "kernel"
    image.write_bytes(b"kernel" * 1000)
    return admin.submit(
        pb.WorkloadSpec(
            name=name,
            vcpus=1,
            memory_mib=256,
            kernel=pb.KernelBoot(kernel_sha256=admin.upload_image(image)),
        )
    )


def _events(coordinator: RunningCoordinator, workload_id: str) -> list[tuple[str, str | None, int]]:
    fleet = coordinator.server.fleet
    assert fleet is not None
    return [(e.kind, e.donor_id, e.epoch) for e in fleet.store.workload_events(workload_id)]


def _state(admin: AdminClient, workload_id: str) -> pb.Workload:
    return next(w for w in admin.workloads() if w.id == workload_id)


def _push(
    donor: RawDonor, workload_id: str, epoch: int, data: bytes, sha256: str | None = None
) -> pb.CheckpointInfo:
    chunks = [
        pb.CheckpointChunk(
            workload_id=workload_id,
            epoch=epoch,
            sha256=sha256 or hashlib.sha256(data).hexdigest(),
            total_size=len(data),
        ),
        *(pb.CheckpointChunk(data=data[i : i + 1000]) for i in range(0, len(data), 1000)),
    ]
    reply: pb.CheckpointInfo = donor.stub.PushCheckpoint(iter(chunks), timeout=10)
    return reply


def _pull(donor: RawDonor, workload_id: str, epoch: int, sha256: str) -> bytes:
    request = pb.CheckpointRequest(workload_id=workload_id, epoch=epoch, sha256=sha256)
    return b"".join(c.data for c in donor.stub.PullCheckpoint(request, timeout=10))


def _running_on(donor: RawDonor, admin: AdminClient, tmp_path: Path) -> pb.Workload:
    workload = _submit(admin, tmp_path)
    run = donor.next_command()
    assert isinstance(run.message, link.RunWorkload)
    donor.send(
        link.Report(capacity(), (link.GuestReport(workload.id, 1, link.GuestState.RUNNING),))
    )
    wait_for(lambda: _state(admin, workload.id).state == pb.WORKLOAD_STATE_RUNNING, 10, "running")
    return workload


@contextmanager
def _source_and_target(
    coordinator: RunningCoordinator, admin: AdminClient, tmp_path: Path
) -> Iterator[tuple[RawDonor, pb.Workload, RawDonor]]:
    """A donor running a workload (epoch 1) and a second, idle donor, both connected."""
    source = _donor(coordinator, admin)
    target: RawDonor | None = None
    try:
        workload = _running_on(source, admin, tmp_path)
        target = _donor(coordinator, admin)
        wait_for(lambda: sum(d.connected for d in admin.donors()) == 2, 10, "two donors")
        yield source, workload, target
    finally:
        if target is not None:
            target.close()
        source.close()


def test_with_no_room_anywhere_the_guest_is_checkpointed_and_restored_later_elsewhere(
    coordinator: RunningCoordinator, admin: AdminClient, tmp_path: Path
) -> None:
    busy = _donor(coordinator, admin)
    workload = _running_on(busy, admin, tmp_path)
    # Its owner stayed: it reports the evacuate level (so it is offered nothing) and
    # reclaims the workload.
    busy.send(
        link.Report(
            capacity(), (link.GuestReport(workload.id, 1, link.GuestState.PAUSED),), "evacuate"
        )
    )
    busy.send(link.Reclaim((workload.id,), "owner_active"))
    save = busy.next_command()
    assert save.message == link.Checkpoint(workload.id, 1, upload=True)
    memory = b"guest memory " * 5000
    info = _push(busy, workload.id, 1, memory)
    assert (info.size, info.epoch, info.donor_id) == (len(memory), 1, busy.creds.donor_id)
    busy.send(link.CommandResult(save.seq, True, checkpoint=serde.checkpoint_from_proto(info, "c")))
    queued = wait_for(
        lambda: (w := _state(admin, workload.id)).state == pb.WORKLOAD_STATE_QUEUED and w,
        10,
        "the workload requeued with its checkpoint",
    )
    assert queued.checkpoint.sha256 == info.sha256
    # The busy donor's saved copy is not re-adopted: the coordinator has the state.
    busy.send(
        link.Report(capacity(), (link.GuestReport(workload.id, 1, link.GuestState.CHECKPOINTED),))
    )
    assert busy.next_command().message == link.StopWorkload(
        workload.id, 1, "stale epoch 1: the workload is at epoch 1 (requeued)"
    )
    busy.close()

    idle = _donor(coordinator, admin)
    try:
        run = idle.next_command()
        assert isinstance(run.message, link.RunWorkload)
        assert run.message.checkpoint is not None
        assert run.message.checkpoint.sha256 == info.sha256
        assert run.message.epoch > 1
        assert _pull(idle, workload.id, run.message.epoch, info.sha256) == memory
        # Only the holder, at its epoch, may pull it.
        with pytest.raises(grpc.RpcError) as caught:
            _pull(idle, workload.id, 1, info.sha256)
        assert caught.value.code() is grpc.StatusCode.PERMISSION_DENIED
    finally:
        idle.close()


def test_a_live_move_prepares_the_target_then_migrates_and_fences_the_old_copy(
    coordinator: RunningCoordinator, admin: AdminClient, tmp_path: Path
) -> None:
    with _source_and_target(coordinator, admin, tmp_path) as (source, workload, target):
        source.send(link.Reclaim((workload.id,), "owner_active"))
        prepare = target.next_command()
        assert isinstance(prepare.message, link.PrepareMigration)
        new_epoch = prepare.message.epoch
        assert new_epoch == 2
        assert prepare.message.source_donor_id == source.creds.donor_id
        assert _state(admin, workload.id).state == pb.WORKLOAD_STATE_EVACUATING
        # Arriving: the target reports its copy stopped; nobody tells it to go away.
        target.send(
            link.Report(
                capacity(), (link.GuestReport(workload.id, 2, link.GuestState.STOPPED, "arriving"),)
            )
        )
        target.send(link.CommandResult(prepare.seq, True, prepared=TARGET))
        evacuate = source.next_command()
        assert evacuate.message == link.Evacuate(
            workload.id, 1, target.creds.donor_id, TARGET, new_epoch, LIMITS
        )
        source.send(
            link.CommandResult(evacuate.seq, True, migration=link.MigrationReport(2.5, 40.0))
        )
        moved = wait_for(
            lambda: (w := _state(admin, workload.id)).donor_id == target.creds.donor_id and w,
            10,
            "the workload on the target",
        )
        assert (moved.state, moved.epoch) == (pb.WORKLOAD_STATE_RUNNING, 2)
        assert "downtime 40 ms" in moved.detail
        target.send(
            link.Report(capacity(), (link.GuestReport(workload.id, 2, link.GuestState.RUNNING),))
        )
        # A copy left on the source (it never should be) is fenced.
        source.send(
            link.Report(capacity(), (link.GuestReport(workload.id, 1, link.GuestState.PAUSED),))
        )
        stop = source.next_command()
        assert isinstance(stop.message, link.StopWorkload)
        assert stop.message.epoch == 1
        kinds = [
            (k, d, e) for k, d, e in _events(coordinator, workload.id) if k in ("migrate", "moved")
        ]
        assert kinds == [
            ("migrate", target.creds.donor_id, 2),
            ("moved", target.creds.donor_id, 2),
        ]
        history = admin.history(workload.id)
        assert [e.kind for e in history.events][-2:] == ["migrate", "moved"]


def test_a_failed_live_migration_falls_back_to_a_cold_move_with_a_fresh_epoch(
    coordinator: RunningCoordinator, admin: AdminClient, tmp_path: Path
) -> None:
    with _source_and_target(coordinator, admin, tmp_path) as (source, workload, target):
        admin.move(workload.id)
        prepare = target.next_command()
        assert isinstance(prepare.message, link.PrepareMigration)
        target.send(link.CommandResult(prepare.seq, True, prepared=TARGET))
        evacuate = source.next_command()
        source.send(link.CommandResult(evacuate.seq, False, "target unreachable"))
        # The target forgets what it prepared; the source saves and uploads.
        assert target.next_command().message == link.StopWorkload(
            workload.id, 2, "migration abandoned"
        )
        save = source.next_command()
        assert save.message == link.Checkpoint(workload.id, 1, upload=True)
        info = _push(source, workload.id, 1, b"state" * 4000)
        source.send(
            link.CommandResult(save.seq, True, checkpoint=serde.checkpoint_from_proto(info, "c"))
        )
        run = target.next_command()
        assert isinstance(run.message, link.RunWorkload)
        assert run.message.epoch == 3  # above the failed attempt's epoch 2
        assert run.message.checkpoint is not None and run.message.checkpoint.sha256 == info.sha256
        record = _state(admin, workload.id)
        assert (record.state, record.donor_id) == (
            pb.WORKLOAD_STATE_ASSIGNED,
            target.creds.donor_id,
        )
        kinds = [k for k, _, _ in _events(coordinator, workload.id)]
        assert kinds[-4:] == ["migrate", "migrate-failed", "checkpoint", "moved-cold"]


def test_a_target_reporting_the_guest_running_is_adopted_even_without_the_sources_answer(
    coordinator: RunningCoordinator, admin: AdminClient, tmp_path: Path
) -> None:
    with _source_and_target(coordinator, admin, tmp_path) as (source, workload, target):
        admin.move(workload.id)
        prepare = target.next_command()
        target.send(link.CommandResult(prepare.seq, True, prepared=TARGET))
        source.next_command()  # the Evacuate; its answer is lost (say, a restart)
        target.send(
            link.Report(capacity(), (link.GuestReport(workload.id, 2, link.GuestState.RUNNING),))
        )
        moved = wait_for(
            lambda: (
                (w := _state(admin, workload.id)).state == pb.WORKLOAD_STATE_RUNNING
                and w.donor_id == target.creds.donor_id
                and w
            ),
            10,
            "the target adopted",
        )
        assert moved.epoch == 2


def _wait_ack(donor: RawDonor, seq: int) -> None:
    """Until the coordinator acknowledged event `seq`; any other command fails."""
    while True:
        command = donor.next_command(skip_acks=False)
        assert isinstance(command.message, link.Ack), command.message
        if command.message.event_seq == seq:
            return


def test_whatever_the_target_reports_mid_move_it_is_not_fenced(
    coordinator: RunningCoordinator, admin: AdminClient, tmp_path: Path
) -> None:
    """The target's reports race the source's answer: a failed look at the incoming
    guest must not get it destroyed as a stale copy just as it arrives."""
    with _source_and_target(coordinator, admin, tmp_path) as (source, workload, target):
        admin.move(workload.id)
        prepare = target.next_command()
        target.send(link.CommandResult(prepare.seq, True, prepared=TARGET))
        evacuate = source.next_command()
        for state, detail in (
            (link.GuestState.STOPPED, "arriving"),
            (link.GuestState.FAILED, "libvirt busy"),
            (link.GuestState.STARTING, ""),
        ):
            seq = target.send(
                link.Report(capacity(), (link.GuestReport(workload.id, 2, state, detail),))
            )
            _wait_ack(target, seq)  # handled before the source answers
        source.send(
            link.CommandResult(evacuate.seq, True, migration=link.MigrationReport(2.0, 30.0))
        )
        wait_for(
            lambda: _state(admin, workload.id).donor_id == target.creds.donor_id,
            10,
            "the workload on the target",
        )
        target.send(
            link.Report(capacity(), (link.GuestReport(workload.id, 2, link.GuestState.RUNNING),))
        )
        # The next thing the target hears is the Evacuate of a second move (back to the
        # first donor), never a StopWorkload of the guest it now holds.
        admin.move(workload.id)
        prepare_back = source.next_command()
        assert isinstance(prepare_back.message, link.PrepareMigration)
        source.send(link.CommandResult(prepare_back.seq, True, prepared=TARGET))
        evacuate_back = target.next_command()
        assert isinstance(evacuate_back.message, link.Evacuate), evacuate_back.message
        assert evacuate_back.message.epoch == 2


def test_checkpoint_uploads_are_checked_and_keep_nothing_when_refused(
    coordinator: RunningCoordinator, admin: AdminClient, tmp_path: Path
) -> None:
    holder = _donor(coordinator, admin)
    workload = _running_on(holder, admin, tmp_path)
    other = _donor(coordinator, admin)
    fleet = coordinator.server.fleet
    assert fleet is not None
    try:
        with pytest.raises(grpc.RpcError) as caught:
            _push(other, workload.id, 1, b"not yours")
        assert caught.value.code() is grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(grpc.RpcError) as caught:
            _push(holder, workload.id, 1, b"data", sha256="0" * 64)
        assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "sha256" in (caught.value.details() or "")
        with pytest.raises(grpc.RpcError) as caught:
            _push(holder, workload.id, 7, b"data")
        assert caught.value.code() is grpc.StatusCode.PERMISSION_DENIED
        assert not _state(admin, workload.id).HasField("checkpoint")
        directory = fleet.checkpoints.root / "sha256"
        assert (
            not [p for p in directory.glob("*") if not p.name.startswith(".")]
            if directory.exists()
            else True
        )
        # A good one is kept; the next replaces it (the old file goes).
        first = _push(holder, workload.id, 1, b"one" * 100)
        second = _push(holder, workload.id, 1, b"two" * 100)
        assert _state(admin, workload.id).checkpoint.sha256 == second.sha256
        assert not fleet.checkpoints.has(first.sha256)
        assert fleet.checkpoints.has(second.sha256)
    finally:
        other.close()
        holder.close()


def test_admin_move_refuses_what_cannot_move(
    coordinator: RunningCoordinator, admin: AdminClient, tmp_path: Path
) -> None:
    with pytest.raises(AdminError) as caught:
        admin.move("w-nope")
    assert caught.value.code is grpc.StatusCode.NOT_FOUND
    queued = _submit(admin, tmp_path, "waiting")
    with pytest.raises(AdminError) as caught:
        admin.move(queued.id)
    assert caught.value.code is grpc.StatusCode.FAILED_PRECONDITION
    assert "queued" in str(caught.value)


def test_running_workloads_are_checkpointed_periodically(tmp_path: Path) -> None:
    config = FleetConfig(
        lease_ttl=timedelta(seconds=20),
        report_interval=timedelta(seconds=1),
        checkpoint_interval=timedelta(seconds=2),
    )
    with (
        running_coordinator(tmp_path / "coordinator", fleet=config) as coordinator,
        coordinator.admin() as admin,
    ):
        donor = _donor(coordinator, admin)
        try:
            workload = _running_on(donor, admin, tmp_path)
            ask = donor.next_command(timeout=15)
            assert ask.message == link.Checkpoint(workload.id, 1, upload=True, keep_running=True)
        finally:
            donor.close()
