"""Proto ↔ domain conversion for the agent's local API: the only module that knows both.

Wire types never enter the domain; servicers and clients call these functions. What
comes off the wire is checked here: a bad field raises ValueError whose message starts
with the field's path ("until: seconds ..."), which the server answers as
INVALID_ARGUMENT.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Literal

from google.protobuf.timestamp_pb2 import Timestamp

from donor_app.domain.decision import Cause, Decision, EffectiveCaps, Level
from donor_app.domain.guest import GuestState
from donor_app.domain.history import HourBucket, Totals
from donor_app.domain.status import AgentStatus, GuestMove, GuestSnapshot, LinkState, LinkStatus
from donor_app.proto.v1 import agent_pb2 as pb

_LEVELS = {
    Level.RUN: pb.LEVEL_RUN,
    Level.THROTTLED: pb.LEVEL_THROTTLED,
    Level.PAUSED: pb.LEVEL_PAUSED,
    Level.EVACUATE: pb.LEVEL_EVACUATE,
    Level.CHECKPOINT: pb.LEVEL_CHECKPOINT,
}
_LEVELS_BACK = {wire: level for level, wire in _LEVELS.items()}

# A guest's state on this API is a word; a stopped or crashed guest has always been sent
# as libvirt names it.
_GUEST_STATES = {
    GuestState.STARTING: "starting",
    GuestState.RUNNING: "running",
    GuestState.PAUSED: "paused",
    GuestState.CHECKPOINTED: "checkpointed",
    GuestState.STOPPED: "shutoff",
    GuestState.FAILED: "crashed",
    GuestState.OTHER: "other",
}
_GUEST_STATES_BACK = {wire: state for state, wire in _GUEST_STATES.items()}


def timestamp(moment: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(moment.astimezone(UTC))
    return stamp


# protobuf's Timestamp covers 0001-01-01T00:00:00Z to 9999-12-31T23:59:59.999999999Z
# (the range of RFC 3339 and of Python's datetime); nanos are always 0 to 999,999,999.
FIRST_SECOND = -62_135_596_800
LAST_SECOND = 253_402_300_799
MAX_NANOS = 999_999_999


def moment(stamp: Timestamp) -> datetime:
    """A timestamp this program wrote (protobuf's ValueError, naming nothing, if bad)."""
    return stamp.ToDatetime(tzinfo=UTC)


def moment_from_wire(path: str, stamp: Timestamp) -> datetime:
    """A timestamp from another process, as an aware UTC datetime (ValueError naming `path`
    if it is outside protobuf's range).

    Checked here rather than left to `ToDatetime`, whose error names no field (so a
    server could only answer it as an unexpected failure).
    """
    if not FIRST_SECOND <= stamp.seconds <= LAST_SECOND:
        raise ValueError(
            f"{path}: seconds {stamp.seconds} is outside 0001-01-01..9999-12-31 "
            f"({FIRST_SECOND}..{LAST_SECOND})"
        )
    if not 0 <= stamp.nanos <= MAX_NANOS:
        raise ValueError(f"{path}: nanos {stamp.nanos} is outside 0..{MAX_NANOS}")
    return stamp.ToDatetime(tzinfo=UTC)


def _optional_moment(
    message: pb.Status, name: Literal["next_change", "snoozed_until"]
) -> datetime | None:
    if not message.HasField(name):
        return None
    stamp: Timestamp = getattr(message, name)
    return moment_from_wire(name, stamp)


def level_to_proto(level: Level) -> pb.Level.ValueType:
    return _LEVELS[level]


def level_from_proto(wire: pb.Level.ValueType) -> Level:
    try:
        return _LEVELS_BACK[wire]
    except KeyError:
        raise ValueError(f"level: {wire} is not a known level") from None


def guest_state_to_wire(state: GuestState) -> str:
    return _GUEST_STATES[state]


def guest_state_from_wire(path: str, wire: str) -> GuestState:
    """The guest state a word from the wire names (ValueError naming `path` if none)."""
    try:
        return _GUEST_STATES_BACK[wire]
    except KeyError:
        raise ValueError(f"{path}: {wire[:40]!r} is not a known guest state") from None


def link_state_from_wire(path: str, wire: str) -> LinkState:
    """The link state a word from the wire names, NOT_CONFIGURED for none (ValueError
    naming `path` for an unknown word)."""
    try:
        return LinkState(wire or LinkState.NOT_CONFIGURED)
    except ValueError:
        raise ValueError(f"{path}: {wire[:40]!r} is not a known link state") from None


def status_to_proto(status: AgentStatus) -> pb.Status:
    decision = status.decision
    message = pb.Status(
        at=timestamp(status.at),
        level=level_to_proto(decision.level),
        cause=decision.cause.value,
        reason=decision.reason,
        caps=pb.Caps(cpu_percent=decision.caps.cpu_percent, memory_mib=decision.caps.memory_mib),
        snoozed_indefinitely=status.snoozed_indefinitely,
        settings_error=status.settings_error,
        user_agent=status.user_agent,
        coordinator=pb.CoordinatorLink(
            address=status.coordinator.address,
            state=LinkState(status.coordinator.state).value,
            detail=status.coordinator.detail,
            donor_id=status.coordinator.donor_id,
        ),
        guests=[
            pb.GuestStatus(
                name=g.name,
                state=guest_state_to_wire(g.state),
                cpu_percent=g.cpu_percent,
                memory_mib=g.memory_mib,
                cpu_cap_percent=g.cpu_cap_percent,
            )
            for g in status.guests
        ],
        moves=[
            pb.GuestMove(
                at=timestamp(m.at), guest=m.guest, event=m.event, peer=m.peer, detail=m.detail
            )
            for m in status.moves
        ],
    )
    if decision.next_change is not None:
        message.next_change.CopyFrom(timestamp(decision.next_change))
    if status.snoozed_until is not None:
        message.snoozed_until.CopyFrom(timestamp(status.snoozed_until))
    return message


def status_from_proto(message: pb.Status) -> AgentStatus:
    try:
        cause = Cause(message.cause)
    except ValueError:
        raise ValueError(f"cause: {message.cause!r} is not a known cause") from None
    decision = Decision(
        level=level_from_proto(message.level),
        cause=cause,
        caps=EffectiveCaps(message.caps.cpu_percent, int(message.caps.memory_mib)),
        reason=message.reason,
        next_change=_optional_moment(message, "next_change"),
    )
    return AgentStatus(
        at=moment_from_wire("at", message.at),
        decision=decision,
        guests=tuple(
            GuestSnapshot(
                g.name,
                guest_state_from_wire(f"guests[{i}].state", g.state),
                g.cpu_percent,
                g.memory_mib,
                g.cpu_cap_percent,
            )
            for i, g in enumerate(message.guests)
        ),
        snoozed_until=_optional_moment(message, "snoozed_until"),
        snoozed_indefinitely=message.snoozed_indefinitely,
        settings_error=message.settings_error,
        user_agent=message.user_agent,
        coordinator=LinkStatus(
            address=message.coordinator.address,
            state=link_state_from_wire("coordinator.state", message.coordinator.state),
            detail=message.coordinator.detail,
            donor_id=message.coordinator.donor_id,
        ),
        moves=tuple(
            GuestMove(moment_from_wire(f"moves[{i}].at", m.at), m.guest, m.event, m.peer, m.detail)
            for i, m in enumerate(message.moves)
        ),
    )


def history_to_proto(buckets: list[HourBucket], totals: Totals) -> pb.History:
    return pb.History(
        buckets=[
            pb.HourBucket(
                hour=timestamp(b.start),
                cpu_seconds=b.cpu_seconds,
                memory_gib_hours=b.memory_gib_hours,
            )
            for b in buckets
        ],
        cpu_hours=totals.cpu_hours,
        memory_gib_hours=totals.gib_hours,
    )


def history_from_proto(message: pb.History) -> tuple[list[HourBucket], Totals]:
    buckets = [
        HourBucket(
            moment_from_wire(f"buckets[{i}].hour", b.hour), b.cpu_seconds, b.memory_gib_hours
        )
        for i, b in enumerate(message.buckets)
    ]
    return buckets, Totals(message.cpu_hours, message.memory_gib_hours)
