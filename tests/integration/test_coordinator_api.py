"""The coordinator's gRPC API for real: TLS/mTLS ports, enrollment, the donor stream,
placement, leases, fencing, admin, health and metrics — and every kind of bad input
refused with the right status and a message naming the reason, the store unchanged."""

from __future__ import annotations

import queue
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from donor_app.agent.credentials import new_key_and_csr
from donor_app.coordinator.admin_rpc import AdminCredential, AdminError
from donor_app.coordinator.admin_rpc import AdminRpc as AdminClient
from donor_app.coordinator.fleet import FleetConfig
from donor_app.coordinator.tokens import new_token
from donor_app.domain import link
from donor_app.domain.records import WorkloadState
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


@pytest.fixture
def coordinator_fleet() -> FleetConfig:
    """Short leases and reports, so that expiry and fencing happen within a test."""
    return FleetConfig(lease_ttl=timedelta(seconds=3), report_interval=timedelta(seconds=1))


def _token(admin: AdminClient, uses: int = 1) -> str:
    return admin.create_token(3600, uses).token


def _image(admin: AdminClient, tmp_path: Path, content: bytes = b"kernel" * 1000) -> str:
    path = tmp_path / f"image-{len(content)}"
    path.write_bytes(content)
    return admin.upload_image(path)


def _spec(name: str, sha256: str, memory_mib: int = 256) -> pb.WorkloadSpec:
    return pb.WorkloadSpec(
        name=name, vcpus=1, memory_mib=memory_mib, kernel=pb.KernelBoot(kernel_sha256=sha256)
    )


def _store(coordinator: RunningCoordinator):  # type: ignore[no-untyped-def]
    fleet = coordinator.server.fleet
    assert fleet is not None
    return fleet.store


def _donors_snapshot(coordinator: RunningCoordinator) -> list[object]:
    return sorted(
        (d.donor_id, d.revoked, d.drained, d.cert_sha256) for d in _store(coordinator).list_donors()
    )


# --- enrollment -------------------------------------------------------------------------------


def test_enroll_gives_a_certificate_that_opens_the_main_port(
    coordinator: RunningCoordinator, admin: AdminClient
) -> None:
    creds = enroll(coordinator, _token(admin), hostname="desk-42")
    assert creds.donor_id.startswith("d-")
    donors = admin.donors()
    assert [(d.id, d.hostname) for d in donors] == [(creds.donor_id, "desk-42")]
    donor = RawDonor(coordinator.endpoints.address, creds)
    try:
        donor.hello()
        welcome = donor.next_command(skip_acks=False)
        assert welcome.message == link.Welcome(creds.donor_id, 3, 1)
        wait_for(
            lambda: any(d.connected for d in admin.donors()),
            timeout=10,
            what="the donor to show as connected",
        )
    finally:
        donor.close()


def test_a_single_use_token_is_refused_the_second_time(
    coordinator: RunningCoordinator, admin: AdminClient
) -> None:
    token = _token(admin)
    enroll(coordinator, token)
    before = _donors_snapshot(coordinator)
    with pytest.raises(grpc.RpcError) as caught:
        enroll(coordinator, token)
    assert caught.value.code() is grpc.StatusCode.UNAUTHENTICATED
    assert "already used" in (caught.value.details() or "")
    assert _donors_snapshot(coordinator) == before


def test_a_fleet_token_enrolls_as_many_donors_as_its_uses(
    coordinator: RunningCoordinator, admin: AdminClient
) -> None:
    token = _token(admin, uses=3)
    ids = {enroll(coordinator, token).donor_id for _ in range(3)}
    assert len(ids) == 3
    with pytest.raises(grpc.RpcError) as caught:
        enroll(coordinator, token)
    assert caught.value.code() is grpc.StatusCode.UNAUTHENTICATED


def test_an_expired_token_is_refused(coordinator: RunningCoordinator) -> None:
    created = datetime.now(UTC) - timedelta(hours=2)
    text, record = new_token(created, timedelta(hours=1), 1, "old")
    _store(coordinator).add_token(record)
    with pytest.raises(grpc.RpcError) as caught:
        enroll(coordinator, text)
    assert caught.value.code() is grpc.StatusCode.UNAUTHENTICATED
    assert "expired" in (caught.value.details() or "")
    assert _donors_snapshot(coordinator) == []


@pytest.mark.parametrize(
    ("token", "csr", "hostname", "field"),
    [
        ("not-a-token", None, "host", "token"),
        (None, b"-----BEGIN CERTIFICATE REQUEST-----\ngarbage\n", "host", "csr_pem"),
        (None, None, "bad host name!", "hostname"),
    ],
)
def test_malformed_enrollment_is_invalid_argument_and_spends_nothing(
    coordinator: RunningCoordinator,
    admin: AdminClient,
    token: str | None,
    csr: bytes | None,
    hostname: str,
    field: str,
) -> None:
    good_token = _token(admin)
    _, good_csr = new_key_and_csr()
    with (
        grpc.secure_channel(
            coordinator.endpoints.enroll_address, grpc.ssl_channel_credentials(coordinator.ca_pem)
        ) as channel,
        pytest.raises(grpc.RpcError) as caught,
    ):
        pb_grpc.CoordinatorStub(channel).Enroll(
            pb.EnrollRequest(token=token or good_token, csr_pem=csr or good_csr, hostname=hostname),
            timeout=10,
        )
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert (caught.value.details() or "").startswith(f"{field}:")
    assert _donors_snapshot(coordinator) == []
    enroll(coordinator, good_token)  # the token was not spent by the refused attempt


# --- who may call what -------------------------------------------------------------------------


def test_without_a_certificate_only_enroll_answers(coordinator: RunningCoordinator) -> None:
    with grpc.secure_channel(
        coordinator.endpoints.enroll_address, grpc.ssl_channel_credentials(coordinator.ca_pem)
    ) as channel:
        with pytest.raises(grpc.RpcError) as caught:
            pb_grpc.AdminStub(channel).ListDonors(pb.ListDonorsRequest(), timeout=10)
        assert caught.value.code() is grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as caught:
            list(pb_grpc.CoordinatorStub(channel).FetchImage(pb.ImageRequest(sha256="0" * 64)))
        assert caught.value.code() is grpc.StatusCode.UNAUTHENTICATED
        assert "enroll" in (caught.value.details() or "")


def test_the_main_port_refuses_a_caller_without_a_certificate(
    coordinator: RunningCoordinator,
) -> None:
    with (
        grpc.secure_channel(
            coordinator.endpoints.address, grpc.ssl_channel_credentials(coordinator.ca_pem)
        ) as channel,
        pytest.raises(grpc.RpcError) as caught,
    ):
        pb_grpc.AdminStub(channel).ListDonors(pb.ListDonorsRequest(), timeout=10)
    # The TLS handshake itself fails: nothing reaches a handler.
    assert caught.value.code() is grpc.StatusCode.UNAVAILABLE


def test_a_donor_certificate_is_not_an_admin_credential(
    coordinator: RunningCoordinator, admin: AdminClient
) -> None:
    creds = enroll(coordinator, _token(admin))
    with (
        donor_channel(coordinator.endpoints.address, creds) as channel,
        pytest.raises(grpc.RpcError) as caught,
    ):
        pb_grpc.AdminStub(channel).CreateEnrollmentToken(
            pb.CreateTokenRequest(ttl_s=3600, uses=1000), timeout=10
        )
    assert caught.value.code() is grpc.StatusCode.PERMISSION_DENIED


def test_a_revoked_donor_is_cut_off_and_refused(
    coordinator: RunningCoordinator, admin: AdminClient
) -> None:
    creds = enroll(coordinator, _token(admin))
    donor = RawDonor(coordinator.endpoints.address, creds)
    donor.hello()
    donor.next_command(skip_acks=False)
    admin.revoke(creds.donor_id)
    error = donor.wait_error()
    assert error.code() is grpc.StatusCode.PERMISSION_DENIED
    assert "revoked" in (error.details() or "")
    again = RawDonor(coordinator.endpoints.address, creds)
    again.hello()
    error = again.wait_error()
    assert error.code() is grpc.StatusCode.PERMISSION_DENIED
    with (
        donor_channel(coordinator.endpoints.address, creds) as channel,
        pytest.raises(grpc.RpcError) as caught,
    ):
        list(pb_grpc.CoordinatorStub(channel).FetchImage(pb.ImageRequest(sha256="0" * 64)))
    assert caught.value.code() is grpc.StatusCode.PERMISSION_DENIED
    [listed] = admin.donors()
    assert listed.revoked and not listed.connected


# --- the donor stream: bad events --------------------------------------------------------------


@pytest.fixture
def donor(coordinator: RunningCoordinator, admin: AdminClient) -> Iterator[RawDonor]:
    raw = RawDonor(coordinator.endpoints.address, enroll(coordinator, _token(admin)))
    yield raw
    raw.close()


def test_the_first_event_must_be_a_hello(donor: RawDonor) -> None:
    donor.send(link.Report(capacity()))
    error = donor.wait_error()
    assert error.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert "hello" in (error.details() or "")


def test_a_malformed_event_names_the_field(donor: RawDonor) -> None:
    event = pb.DonorEvent(seq=1)
    event.hello.capacity.CopyFrom(pb.Capacity(cores=0, memory_mib=1024, arch="x86_64"))
    donor.send_wire(event)
    error = donor.wait_error()
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert (error.details() or "").startswith("hello.capacity.cores:")


@pytest.mark.parametrize(("seconds", "nanos"), [(253_402_300_800, 0), (0, -1)])
def test_a_time_out_of_range_names_the_field(donor: RawDonor, seconds: int, nanos: int) -> None:
    """Year 10000 or negative nanos: the stream ends INVALID_ARGUMENT, not as if the
    donor had simply closed it."""
    donor.hello()
    event = pb.DonorEvent(seq=2)
    event.report.capacity.CopyFrom(pb.Capacity(cores=1, memory_mib=1024, arch="x86_64"))
    event.report.capacity.lend_until.seconds = seconds
    event.report.capacity.lend_until.nanos = nanos
    donor.send_wire(event)
    error = donor.wait_error()
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert (error.details() or "").startswith("report.capacity.lend_until:")


def test_an_oversize_event_is_refused(donor: RawDonor) -> None:
    donor.hello()
    event = pb.DonorEvent(seq=2)
    event.report.capacity.CopyFrom(pb.Capacity(cores=1, memory_mib=1024, arch="x86_64"))
    event.report.level = "x" * 100_000
    donor.send_wire(event)
    error = donor.wait_error()
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "larger than" in (error.details() or "")


def test_a_message_over_the_server_limit_is_resource_exhausted(donor: RawDonor) -> None:
    donor.hello()
    event = pb.DonorEvent(seq=2)
    event.report.level = "x" * (2 << 20)
    donor.send_wire(event)
    assert donor.wait_error().code() is grpc.StatusCode.RESOURCE_EXHAUSTED


def test_claiming_a_workload_never_given_is_permission_denied(
    coordinator: RunningCoordinator, admin: AdminClient, donor: RawDonor, tmp_path: Path
) -> None:
    other = RawDonor(coordinator.endpoints.address, enroll(coordinator, _token(admin)))
    try:
        other.hello()
        workload = admin.submit(_spec("given-elsewhere", _image(admin, tmp_path)))
        run = other.next_command()
        assert isinstance(run.message, link.RunWorkload)
        before = [(w.id, w.state, w.donor_id, w.epoch) for w in admin.workloads()]
        donor.hello(
            guests=(link.GuestReport(workload.id, run.message.epoch, link.GuestState.RUNNING),)
        )
        error = donor.wait_error()
        assert error.code() is grpc.StatusCode.PERMISSION_DENIED
        assert "never assigned" in (error.details() or "")
        assert [(w.id, w.state, w.donor_id, w.epoch) for w in admin.workloads()] == before
    finally:
        other.close()


# --- admin: bad input ------------------------------------------------------------------------


def test_a_workload_with_an_unknown_image_is_refused(admin: AdminClient) -> None:
    with pytest.raises(AdminError) as caught:
        admin.submit(_spec("no-image", "a" * 64))
    assert caught.value.code is grpc.StatusCode.FAILED_PRECONDITION
    assert "unknown workload image " + "a" * 64 in str(caught.value)
    assert admin.workloads() == []


def test_an_invalid_workload_spec_names_the_field(admin: AdminClient, tmp_path: Path) -> None:
    spec = _spec("too-big", _image(admin, tmp_path))
    spec.vcpus = 500
    with pytest.raises(AdminError) as caught:
        admin.submit(spec)
    assert caught.value.code is grpc.StatusCode.INVALID_ARGUMENT
    assert str(caught.value).startswith("spec.vcpus:")
    assert admin.workloads() == []


def test_an_upload_that_does_not_match_its_sha256_leaves_nothing(
    coordinator: RunningCoordinator, admin: AdminClient
) -> None:
    stub = pb_grpc.AdminStub(admin._channel)
    with pytest.raises(grpc.RpcError) as caught:
        stub.UploadImage(iter([pb.ImageChunk(sha256="b" * 64, total_size=3, data=b"abc")]))
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert (caught.value.details() or "").startswith("sha256:")
    images = coordinator.data_dir / "images" / "sha256"
    assert list(images.iterdir()) == []


def test_token_options_are_validated(admin: AdminClient) -> None:
    with pytest.raises(AdminError) as caught:
        admin.create_token(10, 1)
    assert caught.value.code is grpc.StatusCode.INVALID_ARGUMENT
    assert str(caught.value).startswith("ttl:")


# --- placement, leases, fencing, reclaim ---------------------------------------------------


def test_a_workload_is_placed_on_the_donor_expected_to_stay_idle_longest(
    coordinator: RunningCoordinator, admin: AdminClient, tmp_path: Path
) -> None:
    soon = RawDonor(coordinator.endpoints.address, enroll(coordinator, _token(admin)))
    late = RawDonor(coordinator.endpoints.address, enroll(coordinator, _token(admin)))
    try:
        now = datetime.now(UTC)
        soon.hello(link.Capacity(4, 8192, "x86_64", 100.0, 4096, now + timedelta(minutes=5), True))
        late.hello(link.Capacity(4, 8192, "x86_64", 100.0, 4096, now + timedelta(hours=5), True))
        wait_for(
            lambda: sum(d.connected for d in admin.donors()) == 2,
            timeout=10,
            what="both donors connected",
        )
        workload = admin.submit(_spec("long-job", _image(admin, tmp_path)))
        run = late.next_command()
        assert isinstance(run.message, link.RunWorkload)
        assert (run.message.workload_id, run.message.epoch) == (workload.id, 1)
        late.send(
            link.Report(capacity(), (link.GuestReport(workload.id, 1, link.GuestState.RUNNING),))
        )
        wait_for(
            lambda: admin.workloads()[0].state == pb.WORKLOAD_STATE_RUNNING,
            timeout=10,
            what="the workload reported running",
        )
        assert admin.workloads()[0].donor_id == late.creds.donor_id
    finally:
        soon.close()
        late.close()


def test_a_lost_donor_s_workload_moves_and_its_stale_copy_is_fenced(
    coordinator: RunningCoordinator, admin: AdminClient, tmp_path: Path
) -> None:
    first_creds = enroll(coordinator, _token(admin))
    first = RawDonor(coordinator.endpoints.address, first_creds)
    first.hello()
    workload = admin.submit(_spec("survivor", _image(admin, tmp_path)))
    run = first.next_command()
    assert isinstance(run.message, link.RunWorkload)
    first.send(
        link.Report(capacity(), (link.GuestReport(workload.id, 1, link.GuestState.RUNNING),))
    )
    first.close()  # the donor vanishes; its lease (3 s) runs out

    second = RawDonor(coordinator.endpoints.address, enroll(coordinator, _token(admin)))
    try:
        second.hello()
        moved = second.next_command(timeout=20)
        assert isinstance(moved.message, link.RunWorkload)
        assert (moved.message.workload_id, moved.message.epoch) == (workload.id, 2)
        donors = {d.id: d for d in admin.donors()}
        wait_for(
            lambda: {d.id: d for d in admin.donors()}[first_creds.donor_id].lost,
            timeout=10,
            what="the first donor marked lost",
        )
        assert donors[second.creds.donor_id].connected

        back = RawDonor(coordinator.endpoints.address, first_creds)
        try:
            back.hello(guests=(link.GuestReport(workload.id, 1, link.GuestState.PAUSED),))
            stop = back.next_command()
            assert isinstance(stop.message, link.StopWorkload)
            assert stop.message.workload_id == workload.id
            assert "stale epoch 1" in stop.message.reason
            [current] = admin.workloads()
            assert (current.donor_id, current.epoch) == (second.creds.donor_id, 2)
        finally:
            back.close()
    finally:
        second.close()


def test_cancel_stops_the_workload_on_its_donor(
    coordinator: RunningCoordinator, admin: AdminClient, donor: RawDonor, tmp_path: Path
) -> None:
    donor.hello()
    workload = admin.submit(_spec("short", _image(admin, tmp_path)))
    donor.next_command()
    cancelled = admin.cancel(workload.id)
    assert cancelled.state == pb.WORKLOAD_STATE_CANCELLED
    stop = donor.next_command()
    assert stop.message == link.StopWorkload(workload.id, 1, "cancelled")
    with pytest.raises(AdminError) as caught:
        admin.cancel("w-does-not-exist")
    assert caught.value.code is grpc.StatusCode.NOT_FOUND


def test_state_survives_a_coordinator_restart(tmp_path: Path) -> None:
    data = tmp_path / "coordinator"
    with running_coordinator(data) as first, first.admin() as admin:
        token = _token(admin, uses=2)
        creds = enroll(first, token)
        sha = _image(admin, tmp_path)
        workload = admin.submit(_spec("durable", sha))
        ca = first.ca_pem
    with running_coordinator(data) as second, second.admin() as admin:
        assert second.ca_pem == ca  # the same CA: enrolled donors stay valid
        assert [w.id for w in admin.workloads()] == [workload.id]
        assert [d.id for d in admin.donors()] == [creds.donor_id]
        enroll(second, token)  # the token's second use survived too
        donor = RawDonor(second.endpoints.address, creds)
        try:
            donor.hello()
            run = donor.next_command()
            assert isinstance(run.message, link.RunWorkload)
            assert run.message.workload_id == workload.id
        finally:
            donor.close()


# --- observability -----------------------------------------------------------------------------


def test_health_and_metrics(
    coordinator: RunningCoordinator, admin: AdminClient, donor: RawDonor
) -> None:
    with grpc.secure_channel(
        coordinator.endpoints.enroll_address, grpc.ssl_channel_credentials(coordinator.ca_pem)
    ) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="donor.v1.Coordinator"), timeout=10
        )
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    donor.hello()
    wait_for(
        lambda: any(d.connected for d in admin.donors()), timeout=10, what="the donor connected"
    )
    url = f"http://127.0.0.1:{coordinator.endpoints.metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    assert "donor_coordinator_donors_connected 1.0" in text
    assert 'donor_coordinator_rpc_seconds_count{method="CreateEnrollmentToken"}' in text
    assert 'donor_coordinator_workloads{state="queued"} 0.0' in text


def test_fleet_state_names_match_the_store(coordinator: RunningCoordinator) -> None:
    # The metrics label values are the stored values: renaming one would break both.
    assert {s.value for s in WorkloadState} >= {"queued", "running", "paused", "checkpointed"}


def test_admin_credential_files_are_private(coordinator: RunningCoordinator) -> None:
    assert coordinator.endpoints.admin_key_file.stat().st_mode & 0o777 == 0o600
    credential = AdminCredential.from_files(
        coordinator.endpoints.ca_file,
        coordinator.endpoints.admin_cert_file,
        coordinator.endpoints.admin_key_file,
    )
    with AdminClient(coordinator.endpoints.address, credential) as client:
        assert client.donors() == []


def test_a_donor_back_before_its_workload_moved_keeps_it(
    coordinator: RunningCoordinator, admin: AdminClient, tmp_path: Path
) -> None:
    creds = enroll(coordinator, _token(admin))
    first = RawDonor(coordinator.endpoints.address, creds)
    first.hello()
    workload = admin.submit(_spec("patient", _image(admin, tmp_path)))
    first.next_command()
    first.send(link.Report(capacity(), (link.GuestReport(workload.id, 1, link.GuestState.PAUSED),)))
    first.close()
    wait_for(
        lambda: admin.workloads()[0].state == pb.WORKLOAD_STATE_QUEUED,
        timeout=15,
        what="the workload requeued after its lease",
    )
    back = RawDonor(coordinator.endpoints.address, creds)
    try:
        # Nobody else took it: the epoch is unchanged, so the paused guest (and its
        # state) stays; no StopWorkload, no fresh start.
        back.hello(guests=(link.GuestReport(workload.id, 1, link.GuestState.PAUSED),))
        wait_for(
            lambda: admin.workloads()[0].state == pb.WORKLOAD_STATE_PAUSED,
            timeout=10,
            what="the workload re-adopted",
        )
        [current] = admin.workloads()
        assert (current.donor_id, current.epoch) == (creds.donor_id, 1)
        back.send(
            link.Report(capacity(), (link.GuestReport(workload.id, 1, link.GuestState.PAUSED),))
        )
        ack = back.next_command(skip_acks=False)
        while not isinstance(ack.message, link.Ack):
            assert not isinstance(ack.message, link.StopWorkload | link.RunWorkload), ack
            ack = back.next_command(skip_acks=False)
        # Nothing else arrives (observed for 2 s): no stop, no restart.
        with pytest.raises(queue.Empty):
            back.next_command(timeout=2)
    finally:
        back.close()
