"""Timestamps off the local API's wire: protobuf's range (0001-01-01 to 9999-12-31, nanos
0–999,999,999) converts exactly; anything outside it is refused with a ValueError naming
the field, never protobuf's own error."""

from __future__ import annotations

import re
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from donor_app.domain.decision import Cause, Decision, EffectiveCaps, Level
from donor_app.domain.history import HourBucket, Totals
from donor_app.domain.status import AgentStatus, GuestMove
from donor_app.proto import serde
from donor_app.proto.v1 import agent_pb2 as pb

FIRST_SECOND = -62_135_596_800  # 0001-01-01T00:00:00Z
LAST_SECOND = 253_402_300_799  # 9999-12-31T23:59:59Z
AT = datetime(2025, 3, 4, 5, 6, 7, 890123, tzinfo=UTC)

OUT_OF_RANGE = [
    pytest.param(FIRST_SECOND - 1, 0, "seconds", id="a second before year 1"),
    pytest.param(LAST_SECOND + 1, 0, "seconds", id="a second after year 9999"),
    pytest.param(2**62, 0, "seconds", id="far future"),
    pytest.param(-(2**62), 0, "seconds", id="far past"),
    pytest.param(0, -1, "nanos", id="negative nanos"),
    pytest.param(0, 1_000_000_000, "nanos", id="a whole second of nanos"),
    pytest.param(LAST_SECOND, 1_000_000_000, "nanos", id="last second, nanos too large"),
]


@pytest.mark.parametrize(("seconds", "nanos", "part"), OUT_OF_RANGE)
def test_an_out_of_range_timestamp_is_refused_naming_the_field(
    seconds: int, nanos: int, part: str
) -> None:
    stamp = Timestamp(seconds=seconds, nanos=nanos)
    with pytest.raises(ValueError, match=rf"^snooze\.until: {part} ") as caught:
        serde.moment_from_wire("snooze.until", stamp)
    assert str(seconds if part == "seconds" else nanos) in str(caught.value)


@pytest.mark.parametrize(
    ("seconds", "nanos", "expected"),
    [
        (FIRST_SECOND, 0, datetime(1, 1, 1, tzinfo=UTC)),
        (LAST_SECOND, 999_999_000, datetime(9999, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC)),
        (0, 0, datetime(1970, 1, 1, tzinfo=UTC)),
        (-1, 999_999_999, datetime(1969, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC)),
    ],
)
def test_the_ends_of_the_range_convert_exactly(
    seconds: int, nanos: int, expected: datetime
) -> None:
    value = serde.moment_from_wire("start", Timestamp(seconds=seconds, nanos=nanos))
    assert value == expected
    assert value.tzinfo is not None


def test_a_moment_crosses_the_wire_unchanged() -> None:
    assert serde.moment_from_wire("at", serde.timestamp(AT)) == AT


def _status() -> AgentStatus:
    decision = Decision(Level.RUN, Cause.IDLE, EffectiveCaps(100.0, 4096), "idle", next_change=AT)
    moves = (GuestMove(AT, "w-1", "started"), GuestMove(AT, "w-2", "arrived"))
    return AgentStatus(at=AT, decision=decision, guests=(), snoozed_until=AT, moves=moves)


def _field(message: pb.Status, field: str) -> Timestamp:
    stamp: Timestamp = message.moves[1].at if field == "moves[1].at" else getattr(message, field)
    return stamp


@pytest.mark.parametrize(
    ("field", "part", "value"),
    [
        ("at", "seconds", LAST_SECOND + 1),
        ("next_change", "nanos", -5),
        ("snoozed_until", "seconds", FIRST_SECOND - 1),
        ("moves[1].at", "seconds", 2**40),
    ],
)
def test_a_status_with_a_bad_timestamp_names_it(field: str, part: str, value: int) -> None:
    message = serde.status_to_proto(_status())
    assert serde.status_from_proto(message) == _status()
    setattr(_field(message, field), part, value)
    with pytest.raises(ValueError, match=f"^{re.escape(field)}: {part} "):
        serde.status_from_proto(message)


def test_a_history_with_a_bad_hour_names_the_bucket() -> None:
    buckets = [HourBucket(AT, 1.0, 0.5), HourBucket(AT + timedelta(hours=1), 2.0, 0.5)]
    message = serde.history_to_proto(buckets, Totals(0.5, 1.0))
    assert serde.history_from_proto(message) == (buckets, Totals(0.5, 1.0))
    message.buckets[1].hour.nanos = 2_000_000_000
    with pytest.raises(ValueError, match=r"^buckets\[1\]\.hour: nanos "):
        serde.history_from_proto(message)


def test_a_snoozed_status_survives_the_round_trip() -> None:
    status = replace(_status(), snoozed_until=AT + timedelta(days=1))
    assert serde.status_from_proto(serde.status_to_proto(status)) == status
