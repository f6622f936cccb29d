"""Schema migrations (Alembic, driven from code: no alembic.ini at runtime).

`open_store` calls `upgrade`, so a coordinator brings its database to the newest
schema when it starts. Several coordinators starting at once over one PostgreSQL are
safe: the upgrade runs in one transaction under an advisory lock (PostgreSQL has
transactional DDL); on SQLite it holds the write lock (BEGIN IMMEDIATE) throughout.

Adding a revision (after changing `schema.py`)::

    .venv/bin/python -m donor_app.coordinator.store.migrate revision "add donor labels"

This upgrades a scratch SQLite database to the current head, lets Alembic's
autogenerate compare it with `schema.metadata`, and writes
`migrations/versions/<rev>_<slug>.py`. Read and edit the file (autogenerate misses
renames and data changes, and writes sa.DateTime(timezone=True) for UtcDateTime, which
is the same DDL); keep `down_revision` pointing at the previous head. Then run the
contract suite: `test_migrated_schema_matches_metadata` fails on both databases while
the revision and the metadata disagree. Further commands:
`python -m donor_app.coordinator.store.migrate upgrade URL` and `current URL`.

Notes for revisions:
- SQLite cannot ALTER most things; env.py sets `render_as_batch=True`, so autogenerate
  writes `with op.batch_alter_table(...)` blocks, which rebuild the table.
- Foreign keys are switched off on SQLite while migrations run (a table rebuild drops
  the old table, which with foreign keys on would fail or touch other tables);
  `PRAGMA foreign_key_check` runs before the commit and fails the upgrade if a
  revision left a dangling reference.
- Revisions must not import project code that may change later, apart from the
  schema's constants; write types and values out in the revision.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
import tempfile
import uuid
from collections.abc import Sequence
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, text

from donor_app.coordinator.store.engine import make_engine, write_engine
from donor_app.coordinator.store.ports import StoreError

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
# Key of the PostgreSQL advisory lock held while upgrading ("donor" + 1 as an int64).
_PG_MIGRATION_LOCK = 0x646F6E6F7201


def alembic_config(url: str | None = None) -> Config:
    """An Alembic Config for the migrations directory (optionally with a database)."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    # Revisions named "<rev>_<slug>.py" (new_revision makes revs start with a letter).
    config.set_main_option("file_template", "%%(rev)s_%%(slug)s")
    if url is not None:
        config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def head_revision() -> str:
    """The newest revision in the migrations directory."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    if head is None:
        raise StoreError("no migrations found")
    return head


def current_revision(target: str | Engine) -> str | None:
    """The revision the database is at; None for an empty database."""
    engine = make_engine(target) if isinstance(target, str) else target
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        if isinstance(target, str):
            engine.dispose()


def _sqlite_foreign_keys(conn: Connection, on: bool) -> None:
    # PRAGMA foreign_keys is a no-op inside a transaction, so it goes to the driver
    # connection directly, before SQLAlchemy begins one.
    driver = conn.connection.driver_connection
    assert driver is not None
    driver.execute(f"PRAGMA foreign_keys={'ON' if on else 'OFF'}")


def upgrade(target: str | Engine, revision: str = "head") -> None:
    """Bring the database at `target` (a URL or an Engine from `make_engine`) to
    `revision`; a database already there is left alone. StoreError on failure."""
    engine = make_engine(target) if isinstance(target, str) else target
    sqlite = engine.dialect.name == "sqlite"
    try:
        with write_engine(engine).connect() as conn:
            if sqlite:
                _sqlite_foreign_keys(conn, on=False)
            try:
                with conn.begin():
                    if not sqlite:
                        conn.execute(
                            text("SELECT pg_advisory_xact_lock(:key)"),
                            {"key": _PG_MIGRATION_LOCK},
                        )
                    config = alembic_config()
                    # env.py runs the revisions on this connection, in this transaction.
                    config.attributes["connection"] = conn
                    command.upgrade(config, revision)
                    if sqlite:
                        broken = conn.exec_driver_sql("PRAGMA foreign_key_check").all()
                        if broken:
                            raise StoreError(f"migration left dangling references: {broken}")
            finally:
                if sqlite:
                    _sqlite_foreign_keys(conn, on=True)
    except StoreError:
        raise
    except Exception as exc:
        raise StoreError(f"cannot migrate the database to {revision}: {exc}") from exc
    finally:
        if isinstance(target, str):
            engine.dispose()


def new_revision(message: str) -> None:
    """Autogenerate a revision from the difference between head and `schema.metadata`."""
    with tempfile.TemporaryDirectory(prefix="donor-migrate-") as scratch:
        url = f"sqlite:///{Path(scratch) / 'head.db'}"
        upgrade(url)
        # Revision ids that start with a letter keep the file names valid module names.
        rev_id = "r" + uuid.uuid4().hex[:11]
        config = alembic_config(url)
        if importlib.util.find_spec("ruff") is not None:
            # The new file passes the project's lint and format checks as written.
            config.set_section_option("post_write_hooks", "hooks", "ruff_fix, ruff_format")
            for name, args in (("ruff_fix", "check --fix"), ("ruff_format", "format")):
                config.set_section_option("post_write_hooks", f"{name}.type", "module")
                config.set_section_option("post_write_hooks", f"{name}.module", "ruff")
                config.set_section_option(
                    "post_write_hooks", f"{name}.options", f"{args} REVISION_SCRIPT_FILENAME"
                )
        command.revision(config, message=message, autogenerate=True, rev_id=rev_id)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m donor_app.coordinator.store.migrate")
    sub = parser.add_subparsers(dest="command", required=True)
    rev = sub.add_parser("revision", help="autogenerate a revision from schema.py")
    rev.add_argument("message")
    up = sub.add_parser("upgrade", help="bring a database to head")
    up.add_argument("url")
    cur = sub.add_parser("current", help="print a database's revision")
    cur.add_argument("url")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "revision":
        new_revision(args.message)
    elif args.command == "upgrade":
        upgrade(args.url)
    else:
        sys.stdout.write(f"{current_revision(args.url) or '(empty)'}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
