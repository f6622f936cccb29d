"""Engines for the fleet store: SQLite with its pragmas and BEGIN handling, or a
PostgreSQL pool; the URL forms the store accepts.

Concurrency, SQLite: Python's sqlite3 module would start transactions lazily at the
first write, so a transaction that reads and then writes can find that another
connection wrote in between and fail at once with "database is locked" (busy_timeout
does not apply to that case). We therefore let SQLAlchemy emit BEGIN itself
(`isolation_level = None` on the driver) and write transactions start with
`BEGIN IMMEDIATE` (`write_engine`): they take the write lock first, queue behind each
other for up to `busy_timeout`, and never fail half-way. Read-only transactions use a
plain deferred BEGIN, which under WAL never waits for writers.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import URL, make_url

log = logging.getLogger(__name__)

# How long a SQLite writer waits for the write lock before failing (StoreError).
SQLITE_BUSY_TIMEOUT_MS = 10_000
# Execution option read by the SQLite "begin" listener: start with BEGIN IMMEDIATE.
_SQLITE_IMMEDIATE = "donor_sqlite_immediate"


def _sqlite_wal(cursor: Any) -> None:
    """Put the database file in WAL mode (a lasting property of the file).

    Switching needs a moment alone with the file, and SQLite answers "database is
    locked" at once, without its busy handler, while another connection is opening or
    switching the same new file (several coordinators or threads starting together):
    retry until the busy timeout.
    """
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_MS / 1000
    delay = 0.005
    while True:
        try:
            mode = cursor.execute("PRAGMA journal_mode").fetchone()[0]
            if str(mode).lower() == "wal":
                return
            mode = cursor.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() == "wal":
                return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) and "busy" not in str(exc):
                raise
            mode = f"busy ({exc})"
        if time.monotonic() > deadline:
            # Still a working database, only with readers and the writer serialised.
            log.warning("SQLite database stays in journal mode %s, not WAL", mode)
            return
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


def _sqlite_on_connect(dbapi_connection: Any, _record: Any) -> None:
    # Hand BEGIN/COMMIT to SQLAlchemy (see the module docstring).
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        _sqlite_wal(cursor)  # readers never block the writer
        cursor.execute("PRAGMA synchronous=NORMAL")  # durable at checkpoints; safe in WAL
        cursor.execute("PRAGMA foreign_keys=ON")  # off by default in SQLite
    finally:
        cursor.close()


def _sqlite_on_begin(conn: Connection) -> None:
    immediate = conn.get_execution_options().get(_SQLITE_IMMEDIATE, False)
    conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def normalise_url(url: str | URL) -> URL:
    """The URL with a driver the project ships: plain `postgresql://` becomes
    `postgresql+psycopg://` (SQLAlchemy would otherwise pick psycopg2)."""
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


def make_engine(url: str | URL) -> Engine:
    """An Engine configured for the store: SQLite pragmas and BEGIN handling, or a
    PostgreSQL pool that survives server restarts. ValueError for other databases."""
    parsed = normalise_url(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        database = parsed.database or ""
        if database in ("", ":memory:") or parsed.query.get("mode") == "memory":
            # Each pooled connection would get its own empty database.
            raise ValueError("in-memory SQLite is not supported: use sqlite:///PATH")
        if parsed.get_driver_name() != "pysqlite":
            raise ValueError(f"unsupported SQLite driver {parsed.drivername!r}: use sqlite:///")
        # A pool per process: the coordinator calls from a few worker threads; writers
        # queue on SQLite's lock anyway, readers run in parallel under WAL.
        engine = create_engine(parsed, pool_size=8, max_overflow=8, pool_timeout=30)
        event.listen(engine, "connect", _sqlite_on_connect)
        event.listen(engine, "begin", _sqlite_on_begin)
        return engine
    if backend == "postgresql":
        if parsed.get_driver_name() != "psycopg":
            raise ValueError(
                f"unsupported PostgreSQL driver {parsed.drivername!r}: use postgresql+psycopg://"
            )
        return create_engine(
            parsed,
            pool_size=10,
            max_overflow=10,
            pool_timeout=30,
            pool_pre_ping=True,  # a restarted server or a failover leaves dead connections
            pool_recycle=1800,
        )
    raise ValueError(
        f"unsupported database {parsed.drivername!r}: use sqlite:///PATH or "
        "postgresql+psycopg://USER@HOST/DB"
    )


def write_engine(engine: Engine) -> Engine:
    """`engine` (sharing its pool) whose transactions take SQLite's write lock first."""
    return engine.execution_options(**{_SQLITE_IMMEDIATE: True})


def sqlite_path(url: str | URL) -> Path | None:
    """The database file of a SQLite URL, None for other databases."""
    parsed = normalise_url(url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database:
        return None
    return Path(parsed.database)
