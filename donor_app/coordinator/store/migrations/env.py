"""Alembic's environment for the fleet store: run by Alembic, never imported otherwise.

`migrate.upgrade` passes its connection (already in a transaction, holding the
migration lock) in `config.attributes["connection"]`; the developer command
(`python -m donor_app.coordinator.store.migrate revision ...`) passes a URL instead.
"""

from __future__ import annotations

from typing import Any, Literal

from alembic import context
from alembic.autogenerate.api import AutogenContext
from sqlalchemy import Connection

from donor_app.coordinator.store.engine import make_engine
from donor_app.coordinator.store.schema import UtcDateTime, metadata


def _render_item(kind: str, obj: Any, autogen_context: AutogenContext) -> str | Literal[False]:
    # UtcDateTime only converts values; its DDL is DateTime(timezone=True). Writing it
    # so keeps revisions free of project imports.
    if kind == "type" and isinstance(obj, UtcDateTime):
        return "sa.DateTime(timezone=True)"
    return False


def _configure(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        render_as_batch=True,  # SQLite alters tables by rebuilding them
        compare_type=True,
        render_item=_render_item,
    )


def _run_offline() -> None:
    context.configure(
        url=context.config.get_main_option("sqlalchemy.url"),
        target_metadata=metadata,
        literal_binds=True,
        render_as_batch=True,
        render_item=_render_item,
    )
    with context.begin_transaction():
        context.run_migrations()


def _run_online() -> None:
    given = context.config.attributes.get("connection")
    if isinstance(given, Connection):
        _configure(given)
        # The caller's transaction is already open: Alembic joins it.
        with context.begin_transaction():
            context.run_migrations()
        return
    url = context.config.get_main_option("sqlalchemy.url")
    if url is None:
        raise RuntimeError("no connection and no sqlalchemy.url given to the migrations")
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            _configure(connection)
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    _run_offline()
else:
    _run_online()
