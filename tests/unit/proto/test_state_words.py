"""Guest, link and policy states on the wire: the enums ↔ the words and numbers the two
protocols carry, unchanged, and an unknown value refused naming its field."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from donor_app.domain import link
from donor_app.domain.decision import Cause, Decision, EffectiveCaps, Level
from donor_app.domain.guest import GuestState
from donor_app.domain.status import AgentStatus, GuestSnapshot, LinkState, LinkStatus
from donor_app.proto import coordinator_serde, serde
from donor_app.proto.v1 import coordinator_pb2 as pb

AT = datetime(2025, 3, 4, 5, 6, 7, tzinfo=UTC)
CAP = link.Capacity(4, 8192, "x86_64")
DECISION = Decision(Level.RUN, Cause.IDLE, EffectiveCaps(100.0, 4096), "idle")
NO_LINK = LinkStatus()


def _status(*states: GuestState, coordinator: LinkStatus = NO_LINK) -> AgentStatus:
    guests = tuple(GuestSnapshot(f"g{i}", s, 1.0, 256.0, 100.0) for i, s in enumerate(states))
    return AgentStatus(at=AT, decision=DECISION, guests=guests, coordinator=coordinator)


def test_libvirt_names_are_the_same_states() -> None:
    assert GuestState.SHUTOFF is GuestState.STOPPED
    assert GuestState.CRASHED is GuestState.FAILED


@pytest.mark.parametrize(
    ("state", "word"),
    [
        (GuestState.STARTING, "starting"),
        (GuestState.RUNNING, "running"),
        (GuestState.PAUSED, "paused"),
        (GuestState.CHECKPOINTED, "checkpointed"),
        (GuestState.STOPPED, "shutoff"),
        (GuestState.FAILED, "crashed"),
        (GuestState.OTHER, "other"),
    ],
)
def test_a_guest_state_crosses_the_local_api_as_its_word(state: GuestState, word: str) -> None:
    message = serde.status_to_proto(_status(state))
    assert message.guests[0].state == word
    assert serde.status_from_proto(message).guests[0].state is state


def test_an_unknown_guest_state_from_the_agent_is_refused_naming_the_field() -> None:
    message = serde.status_to_proto(_status(GuestState.RUNNING, GuestState.RUNNING))
    message.guests[1].state = "hibernating"
    with pytest.raises(ValueError, match=r"^guests\[1\]\.state: 'hibernating'"):
        serde.status_from_proto(message)


@pytest.mark.parametrize("state", list(LinkState))
def test_a_link_state_crosses_the_local_api_as_its_word(state: LinkState) -> None:
    message = serde.status_to_proto(_status(coordinator=LinkStatus("c:1", state)))
    assert message.coordinator.state == state.value
    assert serde.status_from_proto(message).coordinator.state is state


def test_no_link_state_on_the_wire_is_not_configured() -> None:
    message = serde.status_to_proto(_status())
    message.coordinator.state = ""
    assert serde.status_from_proto(message).coordinator.state is LinkState.NOT_CONFIGURED


def test_an_unknown_link_state_is_refused_naming_the_field() -> None:
    message = serde.status_to_proto(_status())
    message.coordinator.state = "dancing"
    with pytest.raises(ValueError, match=r"^coordinator\.state: 'dancing'"):
        serde.status_from_proto(message)


@pytest.mark.parametrize("level", [*Level, None])
def test_a_reported_level_crosses_the_coordinator_link(level: Level | None) -> None:
    wire = coordinator_serde.event_to_proto(link.DonorEvent(1, link.Report(CAP, (), level)))
    assert wire.report.level == ("" if level is None else level.value)
    report = coordinator_serde.event_from_proto(wire).message
    assert isinstance(report, link.Report)
    assert report.level is level


def test_an_unknown_level_from_a_donor_is_refused_naming_the_field() -> None:
    wire = coordinator_serde.event_to_proto(link.DonorEvent(1, link.Report(CAP)))
    wire.report.level = "panic"
    with pytest.raises(coordinator_serde.WireError, match=r"^report\.level: 'panic'"):
        coordinator_serde.event_from_proto(wire)


def test_a_state_the_hypervisor_cannot_tell_reaches_the_coordinator_as_failed() -> None:
    report = link.Report(CAP, (link.GuestReport("w-1", 1, GuestState.OTHER),))
    wire = coordinator_serde.event_to_proto(link.DonorEvent(1, report))
    assert wire.report.guests[0].state == pb.GUEST_STATE_FAILED
    back = coordinator_serde.event_from_proto(wire).message
    assert isinstance(back, link.Report)
    assert back.guests[0].state is GuestState.FAILED


def test_an_unknown_guest_state_from_a_donor_is_refused_naming_the_field() -> None:
    report = link.Report(CAP, (link.GuestReport("w-1", 1, GuestState.RUNNING),))
    wire = coordinator_serde.event_to_proto(link.DonorEvent(1, report))
    wire.report.guests[0].state = pb.GUEST_STATE_UNSPECIFIED
    with pytest.raises(coordinator_serde.WireError, match=r"^report\.guests\[0\]\.state:"):
        coordinator_serde.event_from_proto(wire)
