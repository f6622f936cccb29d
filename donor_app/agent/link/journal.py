"""This donor's journal of fleet guest moves: which arrived here and from where, which
left and to where, and how — for the owner at the desk (the tray's "Recent moves").

The coordinator keeps the fleet-wide history; this is the donor's own, small view of
it, so the tray can show it without asking the coordinator. It keeps the latest `KEEP`
moves in a JSON file, written atomically. Storage trouble never reaches the agent: the
journal logs it and goes on in memory (a lost journal only costs the owner a few lines
in a menu; an exception here could fail a migration that succeeded).
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from donor_app.atomic_file import write_atomic
from donor_app.domain.status import GuestMove, MoveEvent

log = logging.getLogger(__name__)

KEEP = 50  # moves kept (and persisted)
SHOWN = 10  # moves handed to `on_change` (what the agent's status carries)
_FORMAT = 1


class MoveJournal:
    """A bounded, persisted journal of guest moves; thread-safe.

    `record` is called on the link's command thread and on the engine thread (an
    incoming guest is found arrived while reporting). `on_change`, if given, is called
    after each record with the latest `SHOWN` moves, newest first, on the recording
    thread and under the journal's lock (so snapshots arrive in order): it must be
    quick and must not call back into the journal.
    """

    def __init__(
        self,
        path: Path,
        *,
        on_change: Callable[[tuple[GuestMove, ...]], None] | None = None,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self._path = path
        self._on_change = on_change
        self._clock = clock or (lambda: datetime.now(UTC))
        self._lock = threading.Lock()
        self._moves: list[GuestMove] = self._load()  # oldest first
        self._save_failing = False

    def record(self, event: MoveEvent, guest: str, peer: str = "", detail: str = "") -> GuestMove:
        """Note that `guest` moved now; returns the move as kept."""
        move = GuestMove(self._clock().astimezone(UTC), guest, event, peer, detail)
        with self._lock:
            self._moves.append(move)
            del self._moves[:-KEEP]
            self._save()
            latest = self._latest(SHOWN)
            if self._on_change is not None:
                try:
                    self._on_change(latest)
                except Exception:  # the journal's listener must not fail a move
                    log.exception("publishing the guest moves failed")
        log.debug("guest move: %s", move)
        return move

    def recent(self, limit: int = SHOWN) -> tuple[GuestMove, ...]:
        """The latest `limit` moves, newest first."""
        with self._lock:
            return self._latest(limit)

    def _latest(self, limit: int) -> tuple[GuestMove, ...]:
        return tuple(reversed(self._moves[-limit:])) if limit > 0 else ()

    # --- the file ---------------------------------------------------------------------

    def _load(self) -> list[GuestMove]:
        try:
            text = self._path.read_text()
        except (FileNotFoundError, NotADirectoryError):
            return []  # no journal yet (saving says so if the path can never hold one)
        except OSError as error:
            return self._set_aside(error)
        try:
            return _parse(json.loads(text))[-KEEP:]
        except (ValueError, TypeError, KeyError) as error:
            return self._set_aside(error)

    def _set_aside(self, error: Exception) -> list[GuestMove]:
        """Keep an unreadable file for a human to look at, and start empty."""
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        aside = self._path.with_name(f"{self._path.name}.corrupt-{stamp}")
        try:
            os.replace(self._path, aside)
            where = f"moved to {aside}"
        except OSError as move_error:
            where = f"left in place ({move_error})"
        log.warning(
            "%s is unreadable (%s); %s; starting with an empty guest move journal",
            self._path,
            error,
            where,
        )
        return []

    def _save(self) -> None:
        """Under the lock. Temp file + rename: a crash leaves the old or the new file."""
        try:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            document = {"format": _FORMAT, "moves": [_dump(m) for m in self._moves]}
            # 0600: the journal names peers and reasons.
            write_atomic(self._path, json.dumps(document).encode(), 0o600)
        except OSError as error:
            # Once per run of failures: a full disk must not flood the log per move.
            if not self._save_failing:
                log.warning("cannot save %s (%s); keeping guest moves in memory", self._path, error)
            self._save_failing = True
            return
        if self._save_failing:
            log.info("%s saved again", self._path)
        self._save_failing = False


def _dump(move: GuestMove) -> dict[str, str]:
    return {
        "at": move.at.isoformat(),
        "guest": move.guest,
        "event": move.event,
        "peer": move.peer,
        "detail": move.detail,
    }


def _parse(raw: Any) -> list[GuestMove]:
    """The file's moves, oldest first; ValueError/TypeError/KeyError when malformed."""
    if not isinstance(raw, dict) or raw.get("format") != _FORMAT:
        raise ValueError("not a guest move journal")
    moves = []
    for entry in raw["moves"]:
        at = datetime.fromisoformat(entry["at"])
        if at.tzinfo is None:
            raise ValueError(f"{entry['at']}: no timezone")
        fields = [entry[key] for key in ("guest", "event", "peer", "detail")]
        if not all(isinstance(value, str) for value in fields):
            raise TypeError(f"{entry}: not all text")
        guest, event, peer, detail = fields
        moves.append(GuestMove(at.astimezone(UTC), guest, event, peer, detail))
    return moves
