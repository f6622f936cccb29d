"""Guest moves in the agent's status: a change that clients must see, and carried over
the local API's wire format both ways."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone

from donor_app.domain.decision import Cause, Decision, EffectiveCaps, Level
from donor_app.domain.status import AgentStatus, GuestMove, LinkStatus
from donor_app.proto import serde

AT = datetime(2025, 1, 6, 9, 30, 15, 123456, tzinfo=UTC)
MOVES = (
    GuestMove(AT, "w-3f2a9c0d11223344", "left", "d-91c0aa5500112233", "live, 2.3 s"),
    GuestMove(AT - timedelta(minutes=20), "w-3f2a9c0d11223344", "arrived", "d-77", "live"),
    GuestMove(AT - timedelta(hours=1), "w-0b1c", "removed", detail="cancelled by admin"),
)


def base() -> AgentStatus:
    decision = Decision(Level.RUN, Cause.IDLE, EffectiveCaps(100.0, 4096), "idle")
    return AgentStatus(
        at=AT, decision=decision, guests=(), coordinator=LinkStatus("c:1", "connected")
    )


def test_a_new_move_is_a_change_for_clients() -> None:
    before = replace(base(), moves=MOVES[1:])
    assert before.same_except_time(replace(before, at=AT + timedelta(seconds=5)))
    assert not before.same_except_time(replace(before, moves=MOVES))
    assert not replace(base(), moves=MOVES).same_except_time(base())


def test_moves_cross_the_wire_both_ways() -> None:
    status = replace(base(), moves=MOVES)
    message = serde.status_to_proto(status)
    assert [m.event for m in message.moves] == ["left", "arrived", "removed"]
    assert message.moves[0].peer == "d-91c0aa5500112233"
    back = serde.status_from_proto(message)
    assert back.moves == MOVES
    assert back == status


def test_a_move_from_another_time_zone_is_the_same_moment() -> None:
    local = AT.astimezone(timezone(timedelta(hours=-5)))
    status = replace(base(), moves=(GuestMove(local, "w-1", "started"),))
    back = serde.status_from_proto(serde.status_to_proto(status))
    assert back.moves[0].at == AT and back.moves[0].at.tzinfo is not None


def test_a_status_without_moves_has_none_on_the_wire() -> None:
    message = serde.status_to_proto(base())
    assert len(message.moves) == 0
    assert serde.status_from_proto(message).moves == ()
