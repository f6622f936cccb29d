"""Checkpoints and images at a real coordinator, over the real protocol: what a donor or
the admin uploads is 0600 in 0700 directories whatever the umask (a checkpoint holds a
guest's memory), with the fleet's database beside it; an older install's wider modes
are narrowed at start; and an upload that is refused, cut or cancelled leaves nothing
in the store, finished or not.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
import threading
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import grpc
import pytest

from donor_app.coordinator.admin_rpc import AdminRpc as AdminClient
from donor_app.coordinator.fleet import FleetConfig
from donor_app.coordinator.images import ImageStore
from donor_app.coordinator.server import MAX_MESSAGE_BYTES
from donor_app.domain import link
from donor_app.domain.vm import SHA256_PATTERN
from donor_app.proto.v1 import coordinator_pb2 as pb
from donor_app.proto.v1 import coordinator_pb2_grpc as pb_grpc
from tests.coordinator_helpers import (
    RawDonor,
    RunningCoordinator,
    capacity,
    donor_channel,
    enroll,
    running_coordinator,
)
from tests.waiting import wait_for

MEMORY = b"guest memory" * 2000  # a few chunks


@pytest.fixture
def coordinator_fleet() -> FleetConfig:
    return FleetConfig(
        lease_ttl=timedelta(seconds=20),
        report_interval=timedelta(seconds=1),
        checkpoint_interval=None,
    )


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _partial(store: ImageStore) -> list[str]:
    """Files in the store that are not finished uploads (`sha256/<hex>`)."""
    return sorted(
        str(path.relative_to(store.root))
        for path in store.root.rglob("*")
        if path.is_file()
        and not (path.parent == store.root / "sha256" and SHA256_PATTERN.fullmatch(path.name))
    )


def _finished(store: ImageStore) -> list[str]:
    directory = store.root / "sha256"
    return sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []


def _donor(coordinator: RunningCoordinator, admin: AdminClient) -> RawDonor:
    donor = RawDonor(
        coordinator.endpoints.address, enroll(coordinator, admin.create_token(60, 1).token)
    )
    donor.hello()
    return donor


def _held_by(donor: RawDonor, admin: AdminClient, tmp_path: Path) -> pb.Workload:
    """A workload running on `donor` at epoch 1."""
    kernel = tmp_path / "kernel"
    kernel.write_bytes(b"kernel" * 1000)
    workload = admin.submit(
        pb.WorkloadSpec(
            name="w",
            vcpus=1,
            memory_mib=256,
            kernel=pb.KernelBoot(kernel_sha256=admin.upload_image(kernel)),
        )
    )
    assert isinstance(donor.next_command().message, link.RunWorkload)
    donor.send(
        link.Report(capacity(), (link.GuestReport(workload.id, 1, link.GuestState.RUNNING),))
    )
    wait_for(
        lambda: any(
            w.id == workload.id and w.state == pb.WORKLOAD_STATE_RUNNING for w in admin.workloads()
        ),
        10,
        "the workload running",
    )
    return workload


def _header(workload_id: str, epoch: int, data: bytes, **fields: object) -> pb.CheckpointChunk:
    values: dict[str, object] = {
        "workload_id": workload_id,
        "epoch": epoch,
        "sha256": hashlib.sha256(data).hexdigest(),
        "total_size": len(data),
    }
    values.update(fields)
    return pb.CheckpointChunk(**values)  # type: ignore[arg-type]


def _data(data: bytes) -> list[pb.CheckpointChunk]:
    return [pb.CheckpointChunk(data=data[i : i + 4096]) for i in range(0, len(data), 4096)]


@pytest.fixture
def held(
    coordinator: RunningCoordinator, admin: AdminClient, tmp_path: Path
) -> Iterator[tuple[RawDonor, pb.Workload, ImageStore]]:
    """A donor holding a workload, and the coordinator's checkpoint store."""
    donor = _donor(coordinator, admin)
    try:
        workload = _held_by(donor, admin, tmp_path)
        fleet = coordinator.server.fleet
        assert fleet is not None
        yield donor, workload, fleet.checkpoints
    finally:
        donor.close()


def _refused(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value


# --- refusals: the coordinator answers after cleaning up --------------------------------


@pytest.mark.parametrize(
    ("case", "code", "details"),
    [
        ("another donor", grpc.StatusCode.PERMISSION_DENIED, "is not held by donor"),
        ("an older epoch", grpc.StatusCode.PERMISSION_DENIED, "at epoch 0"),
        ("a newer epoch", grpc.StatusCode.PERMISSION_DENIED, "at epoch 7"),
        ("a wrong sha256", grpc.StatusCode.INVALID_ARGUMENT, "sha256: the data hashes to"),
        ("a malformed sha256", grpc.StatusCode.INVALID_ARGUMENT, "sha256: 'not hex'"),
        ("more than announced", grpc.StatusCode.INVALID_ARGUMENT, "more than the announced"),
        ("less than announced", grpc.StatusCode.INVALID_ARGUMENT, "received"),
        ("too large", grpc.StatusCode.INVALID_ARGUMENT, "total_size: 68719476737"),
        ("nothing at all", grpc.StatusCode.INVALID_ARGUMENT, "the upload was empty"),
        ("a bad workload id", grpc.StatusCode.INVALID_ARGUMENT, "workload_id"),
    ],
)
def test_a_refused_push_leaves_nothing_in_the_store(
    coordinator: RunningCoordinator,
    admin: AdminClient,
    held: tuple[RawDonor, pb.Workload, ImageStore],
    case: str,
    code: grpc.StatusCode,
    details: str,
) -> None:
    donor, workload, store = held
    pusher = donor
    header = _header(workload.id, 1, MEMORY)
    data = MEMORY
    if case == "another donor":
        pusher = _donor(coordinator, admin)
    elif case == "an older epoch":
        header.epoch = 0
    elif case == "a newer epoch":
        header.epoch = 7
    elif case == "a wrong sha256":
        header.sha256 = "0" * 64
    elif case == "a malformed sha256":
        header.sha256 = "not hex"
    elif case == "more than announced":
        data = MEMORY + b"and then some"
    elif case == "less than announced":
        data = MEMORY[:-1]
    elif case == "too large":
        header.total_size = (64 << 30) + 1
    elif case == "a bad workload id":
        header.workload_id = "../" + workload.id
    chunks = [] if case == "nothing at all" else [header, *_data(data)]
    try:
        error = _refused(lambda: pusher.stub.PushCheckpoint(iter(chunks), timeout=10))
    finally:
        if pusher is not donor:
            pusher.close()
    assert error.code() is code, error.details()
    assert details in (error.details() or "")
    assert _partial(store) == []
    assert _finished(store) == []


def test_a_push_from_a_revoked_donor_leaves_nothing_in_the_store(
    admin: AdminClient, held: tuple[RawDonor, pb.Workload, ImageStore]
) -> None:
    donor, workload, store = held
    admin.revoke(donor.creds.donor_id)
    chunks = [_header(workload.id, 1, MEMORY), *_data(MEMORY)]
    error = _refused(lambda: donor.stub.PushCheckpoint(iter(chunks), timeout=10))
    assert error.code() is grpc.StatusCode.PERMISSION_DENIED, error.details()
    assert _partial(store) == []
    assert _finished(store) == []


# --- uploads that stop half-way: the coordinator cleans up once it notices ------------


def _half_a_push(workload_id: str, release: threading.Event) -> Iterator[pb.CheckpointChunk]:
    """The header and the first chunks, then nothing until `release` (then it ends)."""
    yield _header(workload_id, 1, MEMORY)
    yield from _data(MEMORY)[:2]
    release.wait(30)


@pytest.mark.parametrize("how", ["cancelled", "deadline", "connection closed", "client error"])
def test_a_push_stopped_half_way_leaves_nothing_in_the_store(
    coordinator: RunningCoordinator,
    held: tuple[RawDonor, pb.Workload, ImageStore],
    how: str,
) -> None:
    donor, workload, store = held
    release = threading.Event()
    channel = donor_channel(coordinator.endpoints.address, donor.creds)
    stub = pb_grpc.CoordinatorStub(channel)
    try:
        if how == "client error":

            def chunks() -> Iterator[pb.CheckpointChunk]:
                yield _header(workload.id, 1, MEMORY)
                yield from _data(MEMORY)[:2]
                wait_for(lambda: _partial(store), 10, "the upload to reach the store")
                raise RuntimeError("the donor's disk failed mid-upload")

            error = _refused(lambda: stub.PushCheckpoint(chunks(), timeout=30))
            assert error.code() is grpc.StatusCode.UNKNOWN, error.details()
        else:
            timeout = 3.0 if how == "deadline" else 30.0
            future = stub.PushCheckpoint.future(_half_a_push(workload.id, release), timeout=timeout)
            wait_for(lambda: _partial(store), 10, "the upload to reach the store")
            if how == "cancelled":
                future.cancel()
            elif how == "connection closed":
                channel.close()
            wait_for(future.done, 10, "the push to end")
        wait_for(lambda: not _partial(store), 10, "the partial upload to be removed")
        assert _finished(store) == []
    finally:
        release.set()
        channel.close()


def test_a_chunk_over_the_message_limit_leaves_nothing_in_the_store(
    held: tuple[RawDonor, pb.Workload, ImageStore],
) -> None:
    donor, workload, store = held
    huge = b"m" * (MAX_MESSAGE_BYTES + 1)
    chunks = [_header(workload.id, 1, MEMORY + huge), *_data(MEMORY), pb.CheckpointChunk(data=huge)]
    error = _refused(lambda: donor.stub.PushCheckpoint(iter(chunks), timeout=10))
    assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()
    wait_for(lambda: not _partial(store), 10, "the partial upload to be removed")
    assert _finished(store) == []


def test_a_push_refused_once_uploaded_keeps_nothing(
    admin: AdminClient, held: tuple[RawDonor, pb.Workload, ImageStore]
) -> None:
    """The workload was taken away while its checkpoint was on its way: the verified
    file is not the workload's checkpoint, and goes."""
    donor, workload, store = held
    release = threading.Event()

    def chunks() -> Iterator[pb.CheckpointChunk]:
        yield _header(workload.id, 1, MEMORY)
        yield from _data(MEMORY)[:2]
        release.wait(30)
        yield from _data(MEMORY)[2:]

    future = donor.stub.PushCheckpoint.future(chunks(), timeout=30)
    try:
        wait_for(lambda: _partial(store), 10, "the upload to reach the store")
        admin.cancel(workload.id)
    finally:
        release.set()
    error = future.exception(timeout=10)
    assert isinstance(error, grpc.RpcError)
    assert error.code() is grpc.StatusCode.NOT_FOUND, error.details()
    assert _partial(store) == []
    assert _finished(store) == []


def test_a_good_push_is_kept_privately_and_a_later_one_replaces_it(
    held: tuple[RawDonor, pb.Workload, ImageStore],
) -> None:
    donor, workload, store = held
    first = donor.stub.PushCheckpoint(iter([_header(workload.id, 1, MEMORY), *_data(MEMORY)]))
    assert _finished(store) == [first.sha256]
    second_data = MEMORY[::-1]
    second = donor.stub.PushCheckpoint(
        iter([_header(workload.id, 1, second_data), *_data(second_data)])
    )
    assert _finished(store) == [second.sha256]
    assert _partial(store) == []
    assert _mode(store.path(second.sha256)) == 0o600


# --- images: the admin's uploads ---------------------------------------------------------


@pytest.fixture
def admin_stub(coordinator: RunningCoordinator) -> Iterator[pb_grpc.AdminStub]:
    endpoints = coordinator.endpoints
    credentials = grpc.ssl_channel_credentials(
        endpoints.ca_file.read_bytes(),
        endpoints.admin_key_file.read_bytes(),
        endpoints.admin_cert_file.read_bytes(),
    )
    with grpc.secure_channel(endpoints.address, credentials) as channel:
        yield pb_grpc.AdminStub(channel)


def _image(data: bytes, **fields: object) -> list[pb.ImageChunk]:
    values: dict[str, object] = {
        "sha256": hashlib.sha256(data).hexdigest(),
        "total_size": len(data),
        "data": data[:4096],
    }
    values.update(fields)
    rest = [pb.ImageChunk(data=data[i : i + 4096]) for i in range(4096, len(data), 4096)]
    return [pb.ImageChunk(**values), *rest]  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "case", ["a wrong sha256", "more than announced", "less than announced", "too large"]
)
def test_a_refused_image_upload_leaves_nothing_in_the_store(
    coordinator: RunningCoordinator, admin_stub: pb_grpc.AdminStub, case: str
) -> None:
    fleet = coordinator.server.fleet
    assert fleet is not None
    data = b"disk image" * 2000
    chunks = {
        "a wrong sha256": lambda: _image(data, sha256="0" * 64),
        "more than announced": lambda: _image(data + b"!", total_size=len(data)),
        "less than announced": lambda: _image(data, total_size=len(data) + 1),
        "too large": lambda: _image(data, total_size=(64 << 30) + 1),
    }[case]()
    error = _refused(lambda: admin_stub.UploadImage(iter(chunks), timeout=10))
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert _partial(fleet.images) == []
    assert _finished(fleet.images) == []


@pytest.mark.parametrize("how", ["cancelled", "deadline"])
def test_an_image_upload_stopped_half_way_leaves_nothing_in_the_store(
    coordinator: RunningCoordinator, admin_stub: pb_grpc.AdminStub, how: str
) -> None:
    fleet = coordinator.server.fleet
    assert fleet is not None
    data = b"disk image" * 2000
    release = threading.Event()

    def chunks() -> Iterator[pb.ImageChunk]:
        yield from _image(data)[:2]
        release.wait(30)

    try:
        future = admin_stub.UploadImage.future(chunks(), timeout=3.0 if how == "deadline" else 30)
        wait_for(lambda: _partial(fleet.images), 10, "the upload to reach the store")
        if how == "cancelled":
            future.cancel()
        wait_for(future.done, 10, "the upload to end")
        wait_for(lambda: not _partial(fleet.images), 10, "the partial upload to be removed")
        assert _finished(fleet.images) == []
    finally:
        release.set()


# --- modes -------------------------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o000], ids=["umask-022", "umask-000"])
def test_what_the_coordinator_stores_is_0600_in_0700_directories(
    tmp_path: Path, coordinator_fleet: FleetConfig, umask: int
) -> None:
    old = os.umask(umask)
    try:
        data_dir = tmp_path / "coordinator"
        with running_coordinator(data_dir, fleet=coordinator_fleet) as coordinator:
            with coordinator.admin() as admin:
                donor = _donor(coordinator, admin)
                try:
                    workload = _held_by(donor, admin, tmp_path)
                    donor.stub.PushCheckpoint(
                        iter([_header(workload.id, 1, MEMORY), *_data(MEMORY)]), timeout=10
                    )
                finally:
                    donor.close()
            stored = _private_modes(data_dir)
    finally:
        os.umask(old)
    assert stored["."] == 0o700
    assert {name for name in stored if name.startswith("coordinator.db")} >= {
        "coordinator.db",
        "coordinator.db-wal",
        "coordinator.db-shm",
    }
    assert len([n for n in stored if n.startswith("images/sha256/")]) == 1
    assert len([n for n in stored if n.startswith("images/checkpoints/sha256/")]) == 1
    wrong = {
        name: f"{mode:04o}"
        for name, mode in stored.items()
        if mode != (0o700 if (data_dir / name).is_dir() else 0o600)
    }
    assert wrong == {}


def _private_modes(data_dir: Path) -> dict[str, int]:
    """The data dir, its database files and everything under images/ → their modes.
    (tls/ and endpoints.json are the enrollment's: tls/ is 0700 with its keys 0600.)"""
    found = {".": _mode(data_dir)}
    for path in [*data_dir.glob("coordinator.db*"), data_dir / "images"]:
        found[str(path.relative_to(data_dir))] = _mode(path)
    for path in (data_dir / "images").rglob("*"):
        found[str(path.relative_to(data_dir))] = _mode(path)
    return found


def test_an_older_install_is_narrowed_at_start_and_logged(
    tmp_path: Path, coordinator_fleet: FleetConfig, caplog: pytest.LogCaptureFixture
) -> None:
    data_dir = tmp_path / "coordinator"
    old = os.umask(0o022)
    try:
        with running_coordinator(data_dir, fleet=coordinator_fleet):
            pass
        checkpoints = data_dir / "images" / "checkpoints" / "sha256"
        checkpoints.mkdir(parents=True, exist_ok=True)
        (checkpoints / hashlib.sha256(MEMORY).hexdigest()).write_bytes(MEMORY)
        (checkpoints / ".upload-abc123").write_bytes(MEMORY[:100])  # cut by a crash
        for path in [
            data_dir,
            *data_dir.glob("coordinator.db*"),
            *(data_dir / "images").rglob("*"),
        ]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        (data_dir / "images").chmod(0o755)
        with caplog.at_level(logging.INFO), running_coordinator(data_dir, fleet=coordinator_fleet):
            stored = _private_modes(data_dir)
    finally:
        os.umask(old)
    wrong = {
        name: f"{mode:04o}"
        for name, mode in stored.items()
        if mode != (0o700 if (data_dir / name).is_dir() else 0o600)
    }
    assert wrong == {}
    assert not (checkpoints / ".upload-abc123").exists()
    assert f"{data_dir} had mode 0755" in caplog.text
    assert f"{data_dir / 'coordinator.db'} had mode 0644" in caplog.text
    assert f"{checkpoints}: 1 files allowed more than 0600" in caplog.text
