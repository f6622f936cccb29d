"""The agent's local donation history: donated CPU-seconds and memory GiB-hours per hour.

This module records and queries; `history_file` opens, checks and migrates the file, and
`donor_app.domain.history` holds the value types the tray receives.

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

import logging
import math
import sqlite3
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import TracebackType

from donor_app.agent.history_file import (
    Clock,
    HistoryError,
    is_corruption,
    migrate,
    open_or_recover,
    quarantine,
)
from donor_app.domain.history import (
    HOUR_SECONDS,
    HourBucket,
    Totals,
    hour_ceil,
    hour_floor,
    hour_start,
    hour_window,
    require_aware,
)

logger = logging.getLogger(__name__)

MAX_BUCKETS = 24 * 366
"""At most a leap year of hourly buckets per `buckets()` call (the tray's longest chart)."""

MAX_GUEST_NAME = 256

_UPSERT = (
    "INSERT INTO donation (hour, guest, cpu_seconds, memory_gib_hours) VALUES (?, ?, ?, ?) "
    "ON CONFLICT (hour, guest) DO UPDATE SET "
    "cpu_seconds = cpu_seconds + excluded.cpu_seconds, "
    "memory_gib_hours = memory_gib_hours + excluded.memory_gib_hours"
)


def _utc_now() -> datetime:
    return datetime.now(UTC)


def _check_delta(name: str, value: float) -> None:
    # `not value >= 0` is also true for NaN, which a plain `value < 0` would let through.
    if not math.isfinite(value) or not value >= 0:
        raise ValueError(f"{name}: must be a finite number >= 0, got {value!r}")


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
        return cls(open_or_recover(path, tick), path, tick, commit_interval)

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
        require_aware("now", now)
        if not guest or len(guest) > MAX_GUEST_NAME:
            raise ValueError(f"guest: must be 1 to {MAX_GUEST_NAME} characters, got {guest!r}")
        _check_delta("cpu_seconds", cpu_seconds)
        _check_delta("memory_gib_hours", memory_gib_hours)
        if cpu_seconds == 0 and memory_gib_hours == 0:
            return  # nothing donated: skip the write (the common case while paused)
        row = (hour_floor(now), guest, float(cpu_seconds), float(memory_gib_hours))
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
        if not is_corruption(exc) or self._path is None or self._conn is None:
            return False
        conn, self._conn = self._conn, None
        try:
            moved = quarantine(conn, self._path, "corrupt", self._clock())
            logger.warning(
                "History database %s became corrupt (%s); moved it to %s (kept for "
                "inspection) and started a fresh history",
                self._path,
                exc,
                moved,
            )
            self._conn = open_or_recover(self._path, self._clock)
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
        require_aware("start", start)
        require_aware("end", end)
        if end < start:
            raise ValueError(f"end: {end.isoformat()} is before start {start.isoformat()}")
        if end == start:
            return 0, 0
        return hour_floor(start), hour_ceil(end)

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
            HourBucket(hour_start(hour), *found.get(hour, (0.0, 0.0)))
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
