"""Fleet guests' moves in the tray: the "Recent moves" section, where the guests here
came from, and the wording of each kind of move (pure)."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone

import pytest

from donor_app.domain.decision import Cause, Decision, EffectiveCaps, Level
from donor_app.domain.status import AgentStatus, GuestMove, GuestSnapshot, LinkStatus
from donor_app.gui import moves_view, presenter
from donor_app.gui.presenter import Action

ZONE = timezone(timedelta(hours=1))
NOW = datetime(2025, 1, 6, 15, 0, tzinfo=ZONE)  # a Monday
GUEST = "w-3f2a9c0d11223344"
OTHER = "d-91c0aa5500112233"
HERE = "d-4e4e000011112222"


def at(hour: int, minute: int, days_ago: int = 0) -> datetime:
    """A local wall-clock moment, stored in UTC as the agent sends it."""
    local = datetime(2025, 1, 6, hour, minute, tzinfo=ZONE) - timedelta(days=days_ago)
    return local.astimezone(UTC)


def status(*moves: GuestMove, guests: tuple[str, ...] = ()) -> AgentStatus:
    decision = Decision(Level.RUN, Cause.IDLE, EffectiveCaps(100.0, 8192), "Donating")
    return AgentStatus(
        at=NOW,
        decision=decision,
        guests=tuple(GuestSnapshot(g, "running", 50.0, 256.0, 100.0) for g in guests),
        coordinator=LinkStatus("coord:7443", "connected", donor_id=HERE),
        moves=moves,
    )


@pytest.mark.parametrize(
    ("move", "line"),
    [
        (
            GuestMove(at(14, 2), GUEST, "arrived", OTHER, "live"),
            "14:02 w-3f2a… arrived from d-91c0… (live)",
        ),
        (
            GuestMove(at(13, 40), GUEST, "left", OTHER, "live, 2.3 s"),
            "13:40 w-3f2a… left for d-91c0… (live, 2.3 s)",
        ),
        (GuestMove(at(9, 5), GUEST, "started"), "09:05 w-3f2a… started here"),
        (
            GuestMove(at(9, 5), GUEST, "restored", OTHER),
            "09:05 w-3f2a… restored from a checkpoint taken on d-91c0…",
        ),
        (
            GuestMove(at(9, 5), GUEST, "restored", HERE),
            "09:05 w-3f2a… restored from a checkpoint taken here",
        ),
        (
            GuestMove(at(9, 5), GUEST, "saved", detail="12.5 MiB"),
            "09:05 w-3f2a… saved and handed to the coordinator (12.5 MiB)",
        ),
        (
            GuestMove(at(23, 59, days_ago=1), GUEST, "removed", detail="cancelled by admin"),
            "yesterday 23:59 w-3f2a… removed: cancelled by admin",
        ),
        (GuestMove(at(8, 0, days_ago=3), GUEST, "removed"), "Fri 08:00 w-3f2a… removed"),
        (GuestMove(at(8, 0, days_ago=9), GUEST, "started"), "2024-12-28 w-3f2a… started here"),
        (
            GuestMove(at(8, 0), GUEST, "teleported", OTHER, "new"),
            "08:00 w-3f2a… teleported d-91c0… (new)",
        ),
    ],
)
def test_each_move_in_plain_words(move: GuestMove, line: str) -> None:
    assert moves_view.move_line(move, NOW, HERE) == line


def test_ids_are_shortened_only_when_they_are_the_fleets_long_ones() -> None:
    assert moves_view.short_id(GUEST) == "w-3f2a…"
    assert moves_view.short_id("d-12") == "d-12"
    assert moves_view.short_id("demo-2") == "demo-2"
    assert moves_view.short_id("x" * 40) == "x" * 15 + "…"


def test_a_long_reason_is_cut() -> None:
    move = GuestMove(at(9, 0), GUEST, "removed", detail="fenced: " + "x" * 200)
    line = moves_view.move_line(move, NOW)
    assert line.endswith("…") and len(line) < 90


def test_the_menu_shows_the_latest_five_moves_after_the_header() -> None:
    moves = tuple(GuestMove(at(14, 59 - n), f"w-{n:016x}", "started") for n in range(7))
    entries = presenter.menu_entries(status(*moves), NOW)
    texts = [e.text for e in entries]
    section = texts.index("Recent moves")
    assert entries[section - 1].is_separator
    shown = texts[section + 1 : section + 6]
    assert shown[0] == "14:59 w-0000… started here"
    assert all("started here" in line for line in shown)
    assert entries[section + 6].is_separator
    assert entries[section + 7].action is Action.PAUSE_1H
    assert not any(e.enabled for e in entries[section : section + 6])


def test_without_moves_there_is_no_section() -> None:
    texts = [e.text for e in presenter.menu_entries(status(), NOW)]
    assert "Recent moves" not in texts
    assert texts.count("") == 2  # the two separators the menu always had


def test_the_header_says_where_a_guest_here_came_from() -> None:
    snapshot = status(
        GuestMove(at(14, 2), GUEST, "arrived", OTHER, "live"),
        GuestMove(at(13, 0), "w-aaaa000000000000", "restored", "d-bbbb000000000000"),
        GuestMove(at(12, 0), "w-cccc000000000000", "restored", HERE),  # its own checkpoint
        GuestMove(at(11, 0), "w-dddd000000000000", "arrived", OTHER),  # gone since
        guests=(GUEST, "w-aaaa000000000000", "w-cccc000000000000", "local"),
    )
    lines = presenter.header_lines(snapshot, NOW)
    assert "w-3f2a… came from d-91c0… (live migration)" in lines
    assert "w-aaaa… came from d-bbbb… (checkpoint)" in lines
    assert not any("w-cccc" in line or "w-dddd" in line for line in lines)
    assert "w-3f2a… came from d-91c0… (live migration)" in presenter.tooltip(snapshot, NOW)


def test_a_guest_that_left_again_no_longer_says_where_it_came_from() -> None:
    snapshot = status(
        GuestMove(at(14, 30), GUEST, "left", OTHER, "live, 1.0 s"),
        GuestMove(at(14, 2), GUEST, "arrived", OTHER, "live"),
        guests=(GUEST,),  # still listed in this snapshot, but its latest move is leaving
    )
    assert not any("came from" in line for line in presenter.header_lines(snapshot, NOW))


def test_the_unconnected_menu_has_no_moves() -> None:
    assert "Recent moves" not in [e.text for e in presenter.menu_entries(None, NOW)]
    assert moves_view.moves_lines(replace(status(), moves=()), NOW) == []
