"""The history's SQLite file: creating it private, checking it, migrating its schema,
and moving a bad file aside (see `donor_app.agent.history` for when and why).

`open_or_recover()` returns a checked, migrated connection or raises `HistoryError`;
`History` calls it, and `quarantine()` when SQLite reports corruption later.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import stat
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

logger = logging.getLogger(__name__)

Clock = Callable[[], datetime]
_Migration = Callable[[sqlite3.Connection], None]


class HistoryError(Exception):
    """The history database could not be opened or queried; names the file and why."""


# --- schema -------------------------------------------------------------------------


def _migrate_to_1(conn: sqlite3.Connection) -> None:
    # The hour as UNIX seconds of its UTC start: integer keys sort and range-scan
    # cheaply, and no time zone is stored that could be misread. WITHOUT ROWID: the
    # table is its primary-key index, so the per-record UPSERT touches one b-tree.
    conn.execute(
        "CREATE TABLE donation ("
        " hour INTEGER NOT NULL,"
        " guest TEXT NOT NULL,"
        " cpu_seconds REAL NOT NULL DEFAULT 0,"
        " memory_gib_hours REAL NOT NULL DEFAULT 0,"
        " PRIMARY KEY (hour, guest)"
        ") WITHOUT ROWID"
    )


_MIGRATIONS: tuple[_Migration, ...] = (_migrate_to_1,)
"""`_MIGRATIONS[i]` takes the schema from version i to i + 1. Append, never edit: a later
version adds e.g. `ALTER TABLE donation ADD COLUMN ... DEFAULT ...` here."""

SCHEMA_VERSION = len(_MIGRATIONS)


class SchemaTooNewError(HistoryError):
    """The file's schema is newer than this code knows (the agent was downgraded)."""


def migrate(conn: sqlite3.Connection) -> int:
    """Bring the database to `SCHEMA_VERSION`; returns the version it had before.

    The version lives in `PRAGMA user_version` (0 for a new file). Each step runs in its
    own transaction together with the version bump, so a crash mid-migration leaves the
    file at the last complete version. `conn` must be in autocommit mode
    (`isolation_level=None`). Raises `SchemaTooNewError` when the file is newer,
    `sqlite3.Error` when a step fails.
    """
    before = int(conn.execute("PRAGMA user_version").fetchone()[0])
    if before > SCHEMA_VERSION:
        raise SchemaTooNewError(f"schema version {before}, this agent knows {SCHEMA_VERSION}")
    for version in range(before, SCHEMA_VERSION):
        conn.execute("BEGIN IMMEDIATE")
        try:
            _MIGRATIONS[version](conn)
            # PRAGMA takes no parameters; `version` is an int from range().
            conn.execute(f"PRAGMA user_version = {version + 1}")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
    return before


# --- opening, and moving a bad file aside -------------------------------------------


def is_corruption(exc: sqlite3.Error) -> bool:
    # Only these codes mean "the file's content is bad". Anything else (SQLITE_BUSY: another
    # agent holds the file; SQLITE_CANTOPEN, SQLITE_FULL, SQLITE_IOERR: the environment)
    # would not be fixed by moving the file aside, and moving a live file would lose data.
    code = getattr(exc, "sqlite_errorcode", None)
    if code is None:
        return False
    return code & 0xFF in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)


class _BadFileError(Exception):
    """The file must be moved aside; `kind` is the suffix ("corrupt" or "newer").

    `conn` is the still-open connection to it: see `quarantine` for why it stays open.
    """

    def __init__(self, kind: str, reason: str, conn: sqlite3.Connection) -> None:
        super().__init__(reason)
        self.kind = kind
        self.reason = reason
        self.conn = conn


def _create_private(path: Path) -> None:
    """Create `path` (and its parent) readable by the owner only, or tighten its mode.

    SQLite creates its -wal and -shm files with the database file's mode, so making the
    main file 0600 before SQLite first opens it covers all three.
    """
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        mode = stat.S_IMODE(os.fstat(fd).st_mode)
        if os.name == "posix" and mode & 0o077:
            logger.info("History %s was mode %04o; restricting it to 0600", path, mode)
            os.fchmod(fd, 0o600)
    finally:
        os.close(fd)


def _connect(path: Path) -> sqlite3.Connection:
    """Open, check and migrate `path`. Raises `_BadFileError` (with the connection still
    open) or `sqlite3.Error` (connection closed)."""
    # isolation_level=None: we issue BEGIN/COMMIT ourselves to batch commits.
    # timeout: only another process on the same file (an owner's sqlite3 shell) can make
    # us wait for a lock; keep that wait short, the engine thread records.
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=1.0)
    try:
        try:
            # The first statement reads the header: a non-database fails here.
            rows = conn.execute("PRAGMA quick_check").fetchall()
        except sqlite3.DatabaseError as exc:
            if is_corruption(exc):
                raise _BadFileError("corrupt", str(exc), conn) from exc
            raise
        if rows != [("ok",)]:
            # quick_check lists every problem, one per line; the first names the kind.
            first = str(rows[0][0]).splitlines()
            detail = first[1] if len(first) > 1 else first[0] if first else "no detail"
            raise _BadFileError("corrupt", f"quick_check failed: {detail}", conn)
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            # E.g. some network file systems; the history still works, just slower.
            logger.warning("History %s: WAL not available, journal mode is %s", path, mode)
        conn.execute("PRAGMA synchronous = NORMAL")
        try:
            migrate(conn)
        except SchemaTooNewError as exc:
            raise _BadFileError("newer", str(exc), conn) from exc
        except sqlite3.DatabaseError as exc:
            if is_corruption(exc):
                raise _BadFileError("corrupt", str(exc), conn) from exc
            raise
    except _BadFileError:
        raise
    except BaseException:
        conn.close()
        raise
    return conn


def _move_aside(path: Path, kind: str, now: datetime) -> Path:
    """Rename `path` and its -wal/-shm to `<name>.<kind>-<timestamp>[-n]`; returns it.

    The -wal goes along so the kept copy opens with its last transactions, and because a
    stale -wal left beside the fresh file would be replayed into it.
    """
    stamp = now.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")
    base = path.with_name(f"{path.name}.{kind}-{stamp}")
    target = base
    n = 0
    while any(Path(f"{target}{s}").exists() for s in ("", "-wal", "-shm")):
        n += 1
        target = base.with_name(f"{base.name}-{n}")
    os.replace(path, target)
    for suffix in ("-wal", "-shm"):
        side = Path(f"{path}{suffix}")
        if side.exists():
            os.replace(side, Path(f"{target}{suffix}"))
    return target


def quarantine(conn: sqlite3.Connection, path: Path, kind: str, now: datetime) -> Path:
    """Move the bad file aside, then close `conn`; returns where the file went.

    The order matters: closing the last connection makes SQLite delete the -wal (by
    name), so a -wal holding the file's last transactions would be lost. Renamed first,
    SQLite's delete misses it and the kept copy keeps its -wal. Windows cannot rename a
    file SQLite has open: there we close first and the -wal may go.
    """
    try:
        moved = _move_aside(path, kind, now)
    except PermissionError:
        close_quietly(conn)
        return _move_aside(path, kind, now)
    except BaseException:
        close_quietly(conn)
        raise
    close_quietly(conn)
    # SQLite could not delete these by their old names; tidy up the ones that hold
    # nothing (the -shm is always rebuilt from the -wal; an empty -wal is no data).
    for suffix in ("-shm", "-wal"):
        side = Path(f"{moved}{suffix}")
        with contextlib.suppress(OSError):
            if suffix == "-shm" or side.stat().st_size == 0:
                side.unlink()
    return moved


def close_quietly(conn: sqlite3.Connection) -> None:
    try:
        conn.close()
    except sqlite3.Error:
        # A damaged file can fail its closing checkpoint; the connection is gone anyway.
        logger.debug("Closing a damaged history database failed", exc_info=True)


def open_or_recover(path: Path, clock: Clock) -> sqlite3.Connection:
    try:
        _create_private(path)
        try:
            return _connect(path)
        except _BadFileError as bad:
            moved = quarantine(bad.conn, path, bad.kind, clock())
            logger.warning(
                "History database %s is unusable (%s); moved it to %s (kept for inspection) "
                "and started a fresh history",
                path,
                bad.reason,
                moved,
            )
        _create_private(path)
        return _connect(path)
    except _BadFileError as again:
        close_quietly(again.conn)
        raise HistoryError(f"history {path}: fresh file unusable: {again}") from again
    except (OSError, sqlite3.Error) as exc:
        raise HistoryError(f"history {path}: cannot open: {exc}") from exc
