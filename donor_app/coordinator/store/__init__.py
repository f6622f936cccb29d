"""The coordinator's fleet store: SQLite by default (a file in the data dir), PostgreSQL
by URL. `open_store(url)` migrates the database to the newest schema and returns a
`SqlStore`, which implements the `Store` port (ports.py)."""

from __future__ import annotations

from pathlib import Path

from donor_app.coordinator.store.engine import make_engine, sqlite_path
from donor_app.coordinator.store.memory import InMemoryStore
from donor_app.coordinator.store.migrate import upgrade
from donor_app.coordinator.store.ports import (
    AlreadyExists,
    Conflict,
    Store,
    StoreError,
    TokenRefused,
)
from donor_app.coordinator.store.sql import SqlStore
from donor_app.private_files import PRIVATE_FILE, create_private, narrow, private_dir

__all__ = [
    "AlreadyExists",
    "Conflict",
    "InMemoryStore",
    "SqlStore",
    "Store",
    "StoreError",
    "TokenRefused",
    "default_sqlite_url",
    "open_store",
]

SQLITE_FILE_NAME = "coordinator.db"
# Files SQLite keeps beside the database: they hold the same data.
SQLITE_SIDE_FILES = ("-wal", "-shm", "-journal")


def default_sqlite_url(data_dir: Path) -> str:
    """The default store: a SQLite file in the coordinator's data directory."""
    return f"sqlite:///{data_dir.absolute() / SQLITE_FILE_NAME}"


def open_store(url: str) -> SqlStore:
    """Open the store at `url` (`sqlite:///PATH` or `postgresql+psycopg://...`), bringing
    its schema up to date first. ValueError for an unsupported URL, StoreError when the
    database cannot be reached or migrated.

    The store holds token hashes and the fleet's state, so a SQLite file is 0600 (and
    its directory 0700 when this makes it). SQLite gives the -wal and -shm files it
    creates the database file's mode, so the file is made before SQLite opens it; files
    left wider by an older version are narrowed (and logged)."""
    engine = make_engine(url)
    try:
        path = sqlite_path(url)
        if path is not None:
            _private_sqlite_files(path)
        upgrade(engine)
    except BaseException:
        engine.dispose()
        raise
    return SqlStore(engine)


def _private_sqlite_files(path: Path) -> None:
    if not path.parent.exists():
        private_dir(path.parent)
    create_private(path)  # an empty file is an empty database to SQLite
    for suffix in SQLITE_SIDE_FILES:
        side = path.with_name(path.name + suffix)
        if side.exists():
            narrow(side, PRIVATE_FILE)
