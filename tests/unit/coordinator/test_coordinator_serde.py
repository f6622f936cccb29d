"""Wire validation: every refused field is named; valid messages round-trip."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from donor_app.domain import link
from donor_app.domain.vm import KernelBoot, VmSpec
from donor_app.proto import coordinator_serde as serde
from donor_app.proto.v1 import coordinator_pb2 as pb

SHA = "a" * 64
CAP = link.Capacity(4, 8192, "x86_64", 50.0, 2048, datetime(2026, 1, 1, tzinfo=UTC), True)


@pytest.mark.parametrize(
    "message",
    [
        link.Hello("1.0", CAP, (link.GuestReport("w-1", 3, link.GuestState.RUNNING, "ok"),)),
        link.Report(CAP, (), "run"),
        link.Reclaim(("w-1", "w-2"), "owner_active"),
        link.CommandResult(7, False, "no room"),
    ],
)
def test_events_round_trip(message: link.DonorMessage) -> None:
    event = link.DonorEvent(5, message)
    assert serde.event_from_proto(serde.event_to_proto(event)) == event


@pytest.mark.parametrize(
    "message",
    [
        link.Welcome("d-1", 30, 5),
        link.Ack(9, datetime(2026, 1, 1, tzinfo=UTC)),
        link.RunWorkload(
            "w-1", 2, VmSpec("job", 2, 512, KernelBoot(SHA, None, "console=ttyS0")), 3
        ),
        link.StopWorkload("w-1", 2, "stale"),
        link.Evacuate("w-1", 2, "d-2"),
        link.Checkpoint("w-1", 2),
    ],
)
def test_commands_round_trip(message: link.CoordinatorMessage) -> None:
    command = link.Command(4, message)
    assert serde.command_from_proto(serde.command_to_proto(command)) == command


def _hello(**capacity: object) -> pb.DonorEvent:
    values = {"cores": 4, "memory_mib": 8192, "arch": "x86_64"} | capacity
    event = pb.DonorEvent(seq=1)
    event.hello.capacity.CopyFrom(pb.Capacity(**values))  # type: ignore[arg-type]
    return event


@pytest.mark.parametrize(
    ("event", "field"),
    [
        (_hello(cores=0), "hello.capacity.cores"),
        (_hello(arch="sparc"), "hello.capacity.arch"),
        (_hello(lend_cpu_percent=101.0), "hello.capacity.lend_cpu_percent"),
        (_hello(lend_memory_mib=9000), "hello.capacity.lend_memory_mib"),
        (pb.DonorEvent(seq=1), "kind"),
    ],
)
def test_bad_events_name_the_field(event: pb.DonorEvent, field: str) -> None:
    with pytest.raises(serde.WireError) as caught:
        serde.event_from_proto(event)
    assert str(caught.value).startswith(f"{field}:")


def test_bad_guest_reports_name_the_guest() -> None:
    event = _hello()
    event.hello.guests.add(workload_id="w 1", epoch=1, state=pb.GUEST_STATE_RUNNING)
    with pytest.raises(serde.WireError, match=r"^hello\.guests\[0\]\.workload_id:"):
        serde.event_from_proto(event)
    event = _hello()
    event.hello.guests.add(workload_id="w-1", epoch=1, state=pb.GUEST_STATE_RUNNING)
    event.hello.guests.add(workload_id="w-1", epoch=1, state=pb.GUEST_STATE_PAUSED)
    with pytest.raises(serde.WireError, match="reported twice"):
        serde.event_from_proto(event)


def test_a_spec_is_validated_by_the_domain() -> None:
    spec = pb.WorkloadSpec(
        name="Bad Name", vcpus=1, memory_mib=256, kernel=pb.KernelBoot(kernel_sha256=SHA)
    )
    with pytest.raises(serde.WireError, match=r"^spec\.name:"):
        serde.spec_from_proto(spec)
    spec = pb.WorkloadSpec(name="ok", vcpus=1, memory_mib=256)
    with pytest.raises(serde.WireError, match=r"^spec\.boot:"):
        serde.spec_from_proto(spec)


# --- timestamps off the wire ------------------------------------------------------------------

# Outside what a Timestamp may hold (0001-01-01T00:00:00Z to 9999-12-31T23:59:59.999999999Z):
# (seconds, nanos).
BAD_STAMPS = [
    (253_402_300_800, 0),  # 10000-01-01
    (-62_135_596_801, 0),  # a second before year 1
    (2**63 - 1, 0),
    (-(2**63), 0),
    (0, -1),
    (0, 1_000_000_000),
    (0, 2**31 - 1),
]
EDGE_STAMPS = [(-62_135_596_800, 0), (253_402_300_799, 999_999_999), (0, 0)]


def _with_lend_until(event: pb.DonorEvent, kind: str, seconds: int, nanos: int) -> pb.DonorEvent:
    getattr(event, kind).capacity.lend_until.seconds = seconds
    getattr(event, kind).capacity.lend_until.nanos = nanos
    return event


def _report(**capacity: object) -> pb.DonorEvent:
    event = pb.DonorEvent(seq=2)
    values = {"cores": 4, "memory_mib": 8192, "arch": "x86_64"} | capacity
    event.report.capacity.CopyFrom(pb.Capacity(**values))  # type: ignore[arg-type]
    return event


def _result_with_checkpoint(seconds: int, nanos: int) -> pb.DonorEvent:
    event = pb.DonorEvent(seq=3)
    event.result.command_seq = 4
    event.result.ok = True
    event.result.checkpoint.sha256 = SHA
    event.result.checkpoint.size = 10
    event.result.checkpoint.taken_at.seconds = seconds
    event.result.checkpoint.taken_at.nanos = nanos
    return event


def _donor_events(seconds: int, nanos: int) -> list[tuple[pb.DonorEvent, str]]:
    """Every Timestamp a donor sends, set to (seconds, nanos), and its field path."""
    return [
        (_with_lend_until(_hello(), "hello", seconds, nanos), "hello.capacity.lend_until"),
        (_with_lend_until(_report(), "report", seconds, nanos), "report.capacity.lend_until"),
        (_result_with_checkpoint(seconds, nanos), "result.checkpoint.taken_at"),
    ]


def _commands(seconds: int, nanos: int) -> list[tuple[pb.Command, str]]:
    """Every Timestamp the coordinator sends, set to (seconds, nanos), and its field path."""
    ack = pb.Command(seq=1)
    ack.ack.event_seq = 1
    ack.ack.lease_until.seconds = seconds
    ack.ack.lease_until.nanos = nanos
    run = serde.command_to_proto(
        link.Command(
            2,
            link.RunWorkload(
                "w-1",
                2,
                VmSpec("job", 1, 256, KernelBoot(SHA, None, "console=ttyS0")),
                0,
                link.CheckpointInfo(SHA, 10, 2, datetime(2026, 1, 1, tzinfo=UTC), "d-1"),
            ),
        )
    )
    run.run.checkpoint.taken_at.seconds = seconds
    run.run.checkpoint.taken_at.nanos = nanos
    return [(ack, "ack.lease_until"), (run, "run.checkpoint.taken_at")]


@pytest.mark.parametrize(("seconds", "nanos"), BAD_STAMPS)
def test_a_donor_timestamp_out_of_range_names_the_field(seconds: int, nanos: int) -> None:
    for event, field in _donor_events(seconds, nanos):
        with pytest.raises(serde.WireError) as caught:
            serde.event_from_proto(event)
        assert str(caught.value).startswith(f"{field}: "), field
        assert "is outside" in str(caught.value)  # and what is allowed


@pytest.mark.parametrize(("seconds", "nanos"), BAD_STAMPS)
def test_a_coordinator_timestamp_out_of_range_names_the_field(seconds: int, nanos: int) -> None:
    for command, field in _commands(seconds, nanos):
        with pytest.raises(serde.WireError) as caught:
            serde.command_from_proto(command)
        assert str(caught.value).startswith(f"{field}: "), field


@pytest.mark.parametrize(("seconds", "nanos"), EDGE_STAMPS)
def test_timestamps_at_the_ends_of_the_range_are_read(seconds: int, nanos: int) -> None:
    expected = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(
        seconds=seconds, microseconds=nanos // 1000
    )
    for event, field in _donor_events(seconds, nanos):
        message = serde.event_from_proto(event).message
        if isinstance(message, link.CommandResult):
            assert message.checkpoint is not None
            assert message.checkpoint.taken_at == expected, field
        else:
            assert isinstance(message, link.Hello | link.Report)
            assert message.capacity.lend_until == expected, field
    for command, field in _commands(seconds, nanos):
        read = serde.command_from_proto(command).message
        if isinstance(read, link.Ack):
            assert read.lease_until == expected, field
        else:
            assert isinstance(read, link.RunWorkload)
            assert read.checkpoint is not None
            assert read.checkpoint.taken_at == expected, field
