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


def default_sqlite_url(data_dir: Path) -> str:
    """The default store: a SQLite file in the coordinator's data directory."""
    return f"sqlite:///{data_dir.absolute() / SQLITE_FILE_NAME}"


def open_store(url: str) -> SqlStore:
    """Open the store at `url` (`sqlite:///PATH` or `postgresql+psycopg://...`), bringing
    its schema up to date first. A SQLite file's directory is created (mode 0700: the
    store holds token hashes and the fleet's state). ValueError for an unsupported URL,
    StoreError when the database cannot be reached or migrated."""
    engine = make_engine(url)
    try:
        path = sqlite_path(url)
        if path is not None:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        upgrade(engine)
    except BaseException:
        engine.dispose()
        raise
    return SqlStore(engine)
