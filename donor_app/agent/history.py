"""The agent's local donation history: donated CPU-seconds and memory GiB-hours per hour.

One SQLite file in the agent's data dir (the path is injected), one row per UTC hour and
guest. The engine thread calls `History.record()` every few seconds with the deltas since
its last call; the local-API threads query `buckets()` / `totals()` for the tray.

Durability. `record()` is one UPSERT inside a transaction that stays open and is committed
at most once per `commit_interval` (by the injected clock), and on `flush()` / `close()`.
A crash of the agent therefore loses at most the deltas recorded since the last commit,
i.e. less than `commit_interval` (default 30 s) of donation; committed data survives an
agent crash. With WAL and synchronous=NORMAL a power loss or OS crash may in addition
roll back the last few commits (SQLite's documented trade-off), never corrupt the file.

Robustness. The history is bookkeeping: it must never stop the agent from running.
- A file that is not a SQLite database, fails `PRAGMA quick_check`, or was written by a
  newer schema is moved aside (with its -wal/-shm) to `<name>.corrupt-<UTC timestamp>`
  (`<name>.newer-<timestamp>` for a newer schema), kept for the owner to inspect, one
  warning is logged, and a fresh history starts. The same happens if SQLite reports
  corruption later, while the agent runs.
- Storage errors while recording (disk full, I/O error) are logged once and the deltas
  not yet committed are dropped: `record()`, `flush()` and `close()` raise only
  `ValueError`, for bad arguments. Queries raise `HistoryError`.
- Other failures to open (permission denied, the file locked by another agent) raise
  `HistoryError`: moving the file aside would not fix them. The agent can log it and
  carry on with `History.in_memory()`.

Threads. One connection opened with `check_same_thread=False`, every use of it under one
`threading.Lock`: the engine thread writes while local-API threads read. Readers share the
writer's connection, so they also see the deltas not committed yet.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sqlite3
import stat
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import TracebackType

logger = logging.getLogger(__name__)

HOUR_SECONDS = 3600
MAX_BUCKETS = 24 * 366
"""At most a leap year of hourly buckets per `buckets()` call (the tray's longest chart)."""

MAX_GUEST_NAME = 256

Clock = Callable[[], datetime]
_Migration = Callable[[sqlite3.Connection], None]

_UPSERT = (
    "INSERT INTO donation (hour, guest, cpu_seconds, memory_gib_hours) VALUES (?, ?, ?, ?) "
    "ON CONFLICT (hour, guest) DO UPDATE SET "
    "cpu_seconds = cpu_seconds + excluded.cpu_seconds, "
    "memory_gib_hours = memory_gib_hours + excluded.memory_gib_hours"
)


class HistoryError(Exception):
    """The history database could not be opened or queried; names the file and why."""


@dataclass(frozen=True, slots=True)
class HourBucket:
    """What was donated during one UTC hour, summed over guests.

    `start` is the hour's start (timezone-aware, UTC). `memory_gib_hours` is the integral
    of the guests' memory over the hour, e.g. 2 GiB held for 30 minutes is 1.0.
    """

    start: datetime
    cpu_seconds: float
    memory_gib_hours: float


@dataclass(frozen=True, slots=True)
class Totals:
    """What was donated over a span of hours: CPU-hours and memory GiB-hours."""

    cpu_hours: float
    gib_hours: float


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


# --- time helpers -------------------------------------------------------------------


def _utc_now() -> datetime:
    return datetime.now(UTC)


def _require_aware(name: str, value: datetime) -> None:
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{name}: must be timezone-aware, got naive {value.isoformat()}")


def _hour_floor(value: datetime) -> int:
    """UNIX seconds of the start of the UTC hour containing `value`."""
    return math.floor(value.timestamp()) // HOUR_SECONDS * HOUR_SECONDS


def _hour_ceil(value: datetime) -> int:
    """UNIX seconds of the first UTC hour start at or after `value`."""
    return -(-math.ceil(value.timestamp()) // HOUR_SECONDS) * HOUR_SECONDS


def _hour_datetime(hour: int) -> datetime:
    return datetime.fromtimestamp(hour, UTC)


def hour_window(now: datetime, hours: int) -> tuple[datetime, datetime]:
    """The `hours` UTC hour buckets ending with the one containing `now`, as (start, end).

    The current, partial hour counts as one of them, so `hour_window(now, 24)` is the
    chart of "the last day": 24 bars, the last one still growing.
    """
    _require_aware("now", now)
    if hours < 1:
        raise ValueError(f"hours: must be at least 1, got {hours}")
    end = _hour_floor(now) + HOUR_SECONDS
    return _hour_datetime(end - hours * HOUR_SECONDS), _hour_datetime(end)


def _check_delta(name: str, value: float) -> None:
    # `not value >= 0` is also true for NaN, which a plain `value < 0` would let through.
    if not math.isfinite(value) or not value >= 0:
        raise ValueError(f"{name}: must be a finite number >= 0, got {value!r}")


# --- opening, and moving a bad file aside -------------------------------------------


def _is_corruption(exc: sqlite3.Error) -> bool:
    # Only these codes mean "the file's content is bad". Anything else (SQLITE_BUSY: another
    # agent holds the file; SQLITE_CANTOPEN, SQLITE_FULL, SQLITE_IOERR: the environment)
    # would not be fixed by moving the file aside, and moving a live file would lose data.
    code = getattr(exc, "sqlite_errorcode", None)
    if code is None:
        return False
    return code & 0xFF in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)


class _BadFileError(Exception):
    """The file must be moved aside; `kind` is the suffix ("corrupt" or "newer").

    `conn` is the still-open connection to it: see `_quarantine` for why it stays open.
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
            if _is_corruption(exc):
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
            if _is_corruption(exc):
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


def _quarantine(conn: sqlite3.Connection, path: Path, kind: str, now: datetime) -> Path:
    """Move the bad file aside, then close `conn`; returns where the file went.

    The order matters: closing the last connection makes SQLite delete the -wal (by
    name), so a -wal holding the file's last transactions would be lost. Renamed first,
    SQLite's delete misses it and the kept copy keeps its -wal. Windows cannot rename a
    file SQLite has open: there we close first and the -wal may go.
    """
    try:
        moved = _move_aside(path, kind, now)
    except PermissionError:
        _close_quietly(conn)
        return _move_aside(path, kind, now)
    except BaseException:
        _close_quietly(conn)
        raise
    _close_quietly(conn)
    # SQLite could not delete these by their old names; tidy up the ones that hold
    # nothing (the -shm is always rebuilt from the -wal; an empty -wal is no data).
    for suffix in ("-shm", "-wal"):
        side = Path(f"{moved}{suffix}")
        with contextlib.suppress(OSError):
            if suffix == "-shm" or side.stat().st_size == 0:
                side.unlink()
    return moved


def _close_quietly(conn: sqlite3.Connection) -> None:
    try:
        conn.close()
    except sqlite3.Error:
        # A damaged file can fail its closing checkpoint; the connection is gone anyway.
        logger.debug("Closing a damaged history database failed", exc_info=True)


def _open_or_recover(path: Path, clock: Clock) -> sqlite3.Connection:
    try:
        _create_private(path)
        try:
            return _connect(path)
        except _BadFileError as bad:
            moved = _quarantine(bad.conn, path, bad.kind, clock())
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
        _close_quietly(again.conn)
        raise HistoryError(f"history {path}: fresh file unusable: {again}") from again
    except (OSError, sqlite3.Error) as exc:
        raise HistoryError(f"history {path}: cannot open: {exc}") from exc


# --- the history --------------------------------------------------------------------


class History:
    """Donated CPU-seconds and memory GiB-hours per UTC hour, in one SQLite file.

    Thread-safe: all methods may be called from any thread (one connection, one lock).
    No method blocks for long: a record is one UPSERT, a query one range scan of the
    primary key. Use `History.open()` or `History.in_memory()`.
    """

    def __init__(
        self,
        conn: sqlite3.Connection,
        path: Path | None,
        clock: Clock,
        commit_interval: timedelta,
    ) -> None:
        """Prefer the `open()` / `in_memory()` constructors; `conn` must be migrated."""
        self._conn: sqlite3.Connection | None = conn
        self._path = path
        self._clock = clock
        self._commit_interval = commit_interval
        self._last_commit = clock()
        self._lock = threading.Lock()
        # Log a failing write once, not every few seconds, until writes work again.
        self._write_failing = False

    @classmethod
    def open(
        cls,
        path: Path,
        clock: Clock | None = None,
        commit_interval: timedelta = timedelta(seconds=30),
    ) -> History:
        """Open (creating it, mode 0600, and its parent, mode 0700) the history at `path`.

        A corrupt file is moved aside and a fresh history started (see the module doc).
        `clock` (default: UTC wall clock) paces commits and names moved-aside files.
        `commit_interval` bounds what a crash can lose. Raises `HistoryError` when the
        file cannot be opened for any reason other than its content.
        """
        tick = clock or _utc_now
        return cls(_open_or_recover(path, tick), path, tick, commit_interval)

    @classmethod
    def in_memory(
        cls, clock: Clock | None = None, commit_interval: timedelta = timedelta(seconds=30)
    ) -> History:
        """A history that is not persisted (the fallback when `open()` fails; tests)."""
        conn = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
        migrate(conn)
        return cls(conn, None, clock or _utc_now, commit_interval)

    @property
    def path(self) -> Path | None:
        """The database file, or None for an in-memory history."""
        return self._path

    def __enter__(self) -> History:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _live(self) -> sqlite3.Connection:
        if self._conn is None:
            raise HistoryError(f"history {self._path}: closed")
        return self._conn

    # --- writing ----------------------------------------------------------------------

    def record(
        self, now: datetime, guest: str, cpu_seconds: float, memory_gib_hours: float
    ) -> None:
        """Add deltas to `guest`'s bucket for the UTC hour containing `now`.

        Called every few seconds with what was donated since the previous call; a delta
        that straddles an hour boundary goes wholly to the hour of `now` (an error of at
        most one call interval). Raises `ValueError`, naming the field, for a naive `now`,
        an empty or over-long `guest`, or a negative, NaN or infinite delta. Storage
        errors are logged and the uncommitted deltas dropped (see the module doc);
        recording on a closed history is ignored, so shutdown order does not matter.
        """
        _require_aware("now", now)
        if not guest or len(guest) > MAX_GUEST_NAME:
            raise ValueError(f"guest: must be 1 to {MAX_GUEST_NAME} characters, got {guest!r}")
        _check_delta("cpu_seconds", cpu_seconds)
        _check_delta("memory_gib_hours", memory_gib_hours)
        if cpu_seconds == 0 and memory_gib_hours == 0:
            return  # nothing donated: skip the write (the common case while paused)
        row = (_hour_floor(now), guest, float(cpu_seconds), float(memory_gib_hours))
        with self._lock:
            conn = self._conn
            if conn is None:
                logger.debug("History closed; dropped a record for %s", guest)
                return
            try:
                if not conn.in_transaction:
                    conn.execute("BEGIN")
                conn.execute(_UPSERT, row)
                tick = self._clock()
                elapsed = tick - self._last_commit
                # A clock that jumped backwards (elapsed < 0) commits too, rather than
                # holding the transaction open until it catches up.
                if elapsed >= self._commit_interval or elapsed < timedelta(0):
                    self._commit_locked(conn, tick)
            except sqlite3.Error as exc:
                self._write_failed_locked(exc, "record")
            else:
                if self._write_failing:
                    logger.info("History %s: writing works again", self._path)
                    self._write_failing = False

    def flush(self) -> None:
        """Commit the deltas recorded so far (storage errors are logged, not raised)."""
        with self._lock:
            conn = self._conn
            if conn is None or not conn.in_transaction:
                return
            try:
                self._commit_locked(conn, self._clock())
            except sqlite3.Error as exc:
                self._write_failed_locked(exc, "flush")

    def close(self) -> None:
        """Commit and close; idempotent. Queries after this raise `HistoryError`."""
        with self._lock:
            conn = self._conn
            if conn is None:
                return
            try:
                if conn.in_transaction:
                    self._commit_locked(conn, self._clock())
            except sqlite3.Error as exc:
                logger.warning("History %s: last commit failed on close: %s", self._path, exc)
            finally:
                self._conn = None
                conn.close()

    def _commit_locked(self, conn: sqlite3.Connection, tick: datetime) -> None:
        conn.execute("COMMIT")
        self._last_commit = tick

    def _write_failed_locked(self, exc: sqlite3.Error, operation: str) -> None:
        conn = self._conn
        if conn is not None and conn.in_transaction:
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                logger.debug("History %s: rollback failed", self._path, exc_info=True)
        if self._recover_if_corrupt_locked(exc):
            return
        if not self._write_failing:
            logger.warning(
                "History %s: %s failed (%s); donation is not being recorded until this is fixed",
                self._path,
                operation,
                exc,
            )
            self._write_failing = True

    def _recover_if_corrupt_locked(self, exc: sqlite3.Error) -> bool:
        """If `exc` says the file went bad while open, move it aside and start afresh."""
        if not _is_corruption(exc) or self._path is None or self._conn is None:
            return False
        conn, self._conn = self._conn, None
        try:
            moved = _quarantine(conn, self._path, "corrupt", self._clock())
            logger.warning(
                "History database %s became corrupt (%s); moved it to %s (kept for "
                "inspection) and started a fresh history",
                self._path,
                exc,
                moved,
            )
            self._conn = _open_or_recover(self._path, self._clock)
        except (OSError, HistoryError) as again:
            # Leave the history closed: records are dropped, queries raise HistoryError,
            # the agent keeps running.
            logger.error("History %s: cannot start a fresh history: %s", self._path, again)
            return True
        self._last_commit = self._clock()
        return True

    # --- reading ----------------------------------------------------------------------

    def _query_locked(self, sql: str, args: tuple[int, int]) -> list[tuple[int, float, float]]:
        conn = self._live()
        try:
            rows: list[tuple[int, float, float]] = conn.execute(sql, args).fetchall()
        except sqlite3.Error as exc:
            self._recover_if_corrupt_locked(exc)
            raise HistoryError(f"history {self._path}: query failed: {exc}") from exc
        return rows

    @staticmethod
    def _span(start: datetime, end: datetime) -> tuple[int, int]:
        """The hour starts [first, stop) of the buckets overlapping [start, end)."""
        _require_aware("start", start)
        _require_aware("end", end)
        if end < start:
            raise ValueError(f"end: {end.isoformat()} is before start {start.isoformat()}")
        if end == start:
            return 0, 0
        return _hour_floor(start), _hour_ceil(end)

    def buckets(self, start: datetime, end: datetime) -> list[HourBucket]:
        """Every UTC hour overlapping [start, end), oldest first, summed over guests.

        Hours with nothing donated are included with zeros, so a chart gets every hour.
        Raises `ValueError` for naive datetimes, `end < start` or more than `MAX_BUCKETS`
        hours, and `HistoryError` if the database fails (or is closed).
        """
        first, stop = self._span(start, end)
        count = (stop - first) // HOUR_SECONDS
        if count > MAX_BUCKETS:
            raise ValueError(f"end: {count} hours requested, at most {MAX_BUCKETS} per call")
        with self._lock:
            rows = self._query_locked(
                "SELECT hour, SUM(cpu_seconds), SUM(memory_gib_hours) FROM donation "
                "WHERE hour >= ? AND hour < ? GROUP BY hour",
                (first, stop),
            )
        found = {hour: (cpu, mem) for hour, cpu, mem in rows}
        return [
            HourBucket(_hour_datetime(hour), *found.get(hour, (0.0, 0.0)))
            for hour in range(first, stop, HOUR_SECONDS)
        ]

    def totals(self, start: datetime, end: datetime) -> Totals:
        """The sums over the UTC hours overlapping [start, end) (hour granularity).

        Raises `ValueError` for naive datetimes or `end < start`, `HistoryError` if the
        database fails (or is closed).
        """
        first, stop = self._span(start, end)
        with self._lock:
            rows = self._query_locked(
                "SELECT 0, TOTAL(cpu_seconds), TOTAL(memory_gib_hours) FROM donation "
                "WHERE hour >= ? AND hour < ?",
                (first, stop),
            )
        _, cpu_seconds, gib_hours = rows[0]
        return Totals(cpu_hours=cpu_seconds / HOUR_SECONDS, gib_hours=gib_hours)

    def last_hours(self, now: datetime, hours: int) -> Totals:
        """Totals over `hour_window(now, hours)`: the current hour and the ones before."""
        return self.totals(*hour_window(now, hours))

    def last_hour(self, now: datetime) -> Totals:
        """Totals of the current UTC hour so far."""
        return self.last_hours(now, 1)

    def last_day(self, now: datetime) -> Totals:
        """Totals of the last 24 UTC hours, the current one included."""
        return self.last_hours(now, 24)

    def last_week(self, now: datetime) -> Totals:
        """Totals of the last 168 UTC hours, the current one included."""
        return self.last_hours(now, 24 * 7)
