"""The donor's journal of guest moves: bounded, newest first, kept across restarts, and
never a failure for the agent when its file is corrupt or cannot be written."""

from __future__ import annotations

import json
import logging
import stat
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from itertools import count
from pathlib import Path

import pytest

from donor_app.agent.link.journal import KEEP, SHOWN, MoveJournal
from donor_app.domain.status import GuestMove

START = datetime(2025, 1, 6, 9, 0, tzinfo=UTC)


def ticking_clock() -> Callable[[], datetime]:
    """A clock a minute further on at each call."""
    minutes = count()
    return lambda: START + timedelta(minutes=next(minutes))


def journal(
    path: Path, on_change: Callable[[tuple[GuestMove, ...]], None] | None = None
) -> MoveJournal:
    return MoveJournal(path, on_change=on_change, clock=ticking_clock())


def test_a_missing_file_is_an_empty_journal(tmp_path: Path) -> None:
    assert journal(tmp_path / "moves.json").recent(10) == ()
    assert not (tmp_path / "moves.json").exists()  # nothing written until a move


def test_moves_come_back_newest_first_with_their_fields(tmp_path: Path) -> None:
    moves = journal(tmp_path / "moves.json")
    moves.record("arrived", "w-1", "d-src", "live")
    moves.record("left", "w-1", "d-dst", "live, 2.3 s")
    assert moves.recent(10) == (
        GuestMove(START + timedelta(minutes=1), "w-1", "left", "d-dst", "live, 2.3 s"),
        GuestMove(START, "w-1", "arrived", "d-src", "live"),
    )
    assert moves.recent(1)[0].event == "left"
    assert moves.recent(0) == ()


def test_only_the_latest_moves_are_kept(tmp_path: Path) -> None:
    path = tmp_path / "moves.json"
    moves = journal(path)
    for number in range(KEEP + 7):
        moves.record("started", f"w-{number}")
    kept = moves.recent(1000)
    assert len(kept) == KEEP
    assert kept[0].guest == f"w-{KEEP + 6}" and kept[-1].guest == "w-7"
    assert len(json.loads(path.read_text())["moves"]) == KEEP


def test_the_journal_survives_a_restart_in_a_private_file(tmp_path: Path) -> None:
    path = tmp_path / "data" / "moves.json"  # its directory is made when needed
    first = journal(path)
    first.record("restored", "w-1", "d-9", "")
    first.record("removed", "w-1", detail="cancelled by admin")
    again = MoveJournal(path)
    assert again.recent(10) == first.recent(10)
    assert again.recent(10)[0].at.tzinfo is not None
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in path.parent.iterdir()] == ["moves.json"]  # no temp file left


def test_each_move_is_handed_on_with_the_latest_few(tmp_path: Path) -> None:
    published: list[tuple[GuestMove, ...]] = []
    moves = journal(tmp_path / "moves.json", on_change=published.append)
    for number in range(SHOWN + 2):
        moves.record("started", f"w-{number}")
    assert len(published) == SHOWN + 2
    assert len(published[-1]) == SHOWN
    assert published[-1][0].guest == f"w-{SHOWN + 1}"
    assert published[0] == (GuestMove(START, "w-0", "started"),)


def test_a_failing_listener_does_not_fail_the_move(tmp_path: Path) -> None:
    def broken(_moves: tuple[GuestMove, ...]) -> None:
        raise RuntimeError("listener bug")

    moves = journal(tmp_path / "moves.json", on_change=broken)
    moves.record("saved", "w-1")
    assert moves.recent(1)[0].event == "saved"


@pytest.mark.parametrize(
    "content",
    [
        "{not json",
        '{"format": 1, "moves": [{"at": "2025-01-06T09:00:00", "guest": "w", "event": "left",'
        ' "peer": "", "detail": ""}]}',  # a naive time
        '{"format": 1, "moves": [{"guest": "w"}]}',
        '{"format": 1, "moves": "w-1"}',
        '{"format": 1, "moves": [{"at": "2025-01-06T09:00:00+00:00", "guest": 3,'
        ' "event": "left", "peer": "", "detail": ""}]}',
        "[]",
    ],
)
def test_a_corrupt_file_is_set_aside_and_the_journal_starts_afresh(
    tmp_path: Path, content: str, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "moves.json"
    path.write_text(content)
    with caplog.at_level(logging.WARNING):
        moves = journal(path)
    assert moves.recent(10) == ()
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("moves.json.corrupt-")]
    assert len(aside) == 1 and aside[0].read_text() == content
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and str(path) in warnings[0].getMessage()
    moves.record("started", "w-1")
    assert MoveJournal(path).recent(10)[0].guest == "w-1"


def test_a_directory_in_the_files_place_is_set_aside(tmp_path: Path) -> None:
    path = tmp_path / "moves.json"
    path.mkdir()
    moves = journal(path)
    assert moves.recent(10) == ()
    moves.record("started", "w-1")
    assert path.is_file()
    assert any(p.name.startswith("moves.json.corrupt-") and p.is_dir() for p in tmp_path.iterdir())


def test_a_path_that_cannot_be_a_file_keeps_the_moves_in_memory(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Also as root: the journal's directory is a file, so nothing can be written."""
    blocker = tmp_path / "data"
    blocker.write_text("a file where the data directory should be")
    moves = journal(blocker / "moves.json")
    with caplog.at_level(logging.WARNING):
        moves.record("started", "w-1")
        moves.record("removed", "w-1", detail="cancelled")
    assert [m.event for m in moves.recent(10)] == ["removed", "started"]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "moves.json" in warnings[0].getMessage()
