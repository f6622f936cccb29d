"""Wire validation: every refused field is named; valid messages round-trip."""

from __future__ import annotations

from datetime import UTC, datetime

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
