"""The fleet store's tables (SQLAlchemy Core), shared by SQLite and PostgreSQL.

This module is the schema the code expects; the Alembic revisions in `migrations/`
create it. After changing a table here, add a revision (see `migrate.py`); the contract
suite checks that the migrated database and this metadata agree.

Times are `UtcDateTime`: aware UTC datetimes in Python, `timestamptz` on PostgreSQL
and fixed-width "YYYY-MM-DD HH:MM:SS.ffffff" UTC text on SQLite (which sorts and
compares correctly as text, so `expires_at > :now` works in SQL on both).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    TypeDecorator,
    false,
)

# Named constraints: Alembic's batch mode (how SQLite alters tables) needs names to
# drop or change a constraint later; unnamed ones get database-chosen names.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_N_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class UtcDateTime(TypeDecorator[datetime]):
    """An aware datetime stored as UTC; naive datetimes are refused (a bug upstream).

    SQLite has no time zone type: SQLAlchemy's SQLite DATETIME silently drops tzinfo,
    so the value is converted to UTC first and UTC is attached again on the way out.
    PostgreSQL's timestamptz keeps the instant; psycopg returns it in the session's
    zone, so it is converted back to UTC. Microseconds survive on both.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(f"naive datetime {value!r}: the store keeps aware UTC times")
        value = value.astimezone(UTC)
        if dialect.name == "sqlite":
            return value.replace(tzinfo=None)
        return value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        assert isinstance(value, datetime)
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


metadata = MetaData(naming_convention=NAMING_CONVENTION)

# Autoincrement 64-bit ids on PostgreSQL; on SQLite only "INTEGER PRIMARY KEY" is the
# rowid alias that autoincrements (BIGINT PRIMARY KEY would not).
_BigId = BigInteger().with_variant(Integer(), "sqlite")

tokens = Table(
    "tokens",
    metadata,
    Column("token_id", String(64), primary_key=True),
    Column("secret_sha256", String(64), nullable=False),
    Column("created_at", UtcDateTime(), nullable=False),
    Column("expires_at", UtcDateTime(), nullable=False),
    Column("uses_left", Integer(), nullable=False),
    Column("note", Text(), nullable=False, server_default=""),
)

# Capacity is flattened into columns (cap_*, NULL cores = no capacity reported yet) so
# placement could filter in SQL later; record_seen rewrites them all at once.
donors = Table(
    "donors",
    metadata,
    Column("donor_id", String(64), primary_key=True),
    Column("hostname", String(255), nullable=False),
    Column("cert_sha256", String(64), nullable=False),
    Column("enrolled_at", UtcDateTime(), nullable=False),
    Column("last_seen", UtcDateTime(), nullable=True),
    Column("drained", Boolean(), nullable=False, server_default=false()),
    Column("revoked", Boolean(), nullable=False, server_default=false()),
    Column("lost", Boolean(), nullable=False, server_default=false()),
    Column("cap_cores", Integer(), nullable=True),
    Column("cap_memory_mib", BigInteger(), nullable=True),
    Column("cap_arch", String(32), nullable=True),
    Column("cap_lend_cpu_percent", Float(), nullable=True),
    Column("cap_lend_memory_mib", BigInteger(), nullable=True),
    Column("cap_lend_until", UtcDateTime(), nullable=True),
    Column("cap_idle", Boolean(), nullable=True),
)

workloads = Table(
    "workloads",
    metadata,
    Column("workload_id", String(64), primary_key=True),
    # VmSpec as canonical JSON text (sql.vmspec_to_json); text rather than JSONB so both
    # databases store and return exactly the same string.
    Column("spec", Text(), nullable=False),
    Column("priority", Integer(), nullable=False),
    # WorkloadState by value; no CHECK so adding a state needs no table rebuild on SQLite.
    Column("state", String(16), nullable=False),
    Column("created_at", UtcDateTime(), nullable=False),
    Column("updated_at", UtcDateTime(), nullable=False),
    Column("donor_id", String(64), ForeignKey("donors.donor_id"), nullable=True),
    Column("epoch", BigInteger(), nullable=False, server_default="0"),
    Column("lease_until", UtcDateTime(), nullable=True),
    Column("detail", Text(), nullable=False, server_default=""),
    # The latest checkpoint (model.CheckpointRef), all five NULL when there is none.
    # The bytes live in the checkpoint file store under the sha256. No foreign key on
    # the donor: a checkpoint outlives the donor it was taken on (revoked, removed).
    Column("checkpoint_sha256", String(64), nullable=True),
    Column("checkpoint_size", BigInteger(), nullable=True),
    Column("checkpoint_epoch", BigInteger(), nullable=True),
    Column("checkpoint_at", UtcDateTime(), nullable=True),
    Column("checkpoint_donor_id", String(64), nullable=True),
    # list_workloads' order; expired_leases' scan; list_workloads(donor_id=...).
    Index("ix_workloads_order", "priority", "created_at"),
    Index("ix_workloads_state_lease", "state", "lease_until"),
    Index("ix_workloads_donor", "donor_id"),
)

workload_events = Table(
    "workload_events",
    metadata,
    Column("event_id", _BigId, primary_key=True, autoincrement=True),
    Column(
        "workload_id",
        String(64),
        ForeignKey("workloads.workload_id"),
        nullable=False,
    ),
    Column("at", UtcDateTime(), nullable=False),
    Column("kind", String(64), nullable=False),
    # No foreign key: history names the donor as it was, even one gone later.
    Column("donor_id", String(64), nullable=True),
    Column("epoch", BigInteger(), nullable=False, server_default="0"),
    Column("detail", Text(), nullable=False, server_default=""),
    Index("ix_workload_events_workload", "workload_id", "at", "event_id"),
)

images = Table(
    "images",
    metadata,
    Column("sha256", String(64), primary_key=True),
    Column("size", BigInteger(), nullable=False),
    Column("added_at", UtcDateTime(), nullable=False),
)

# Sums per (donor, hour of week). No foreign key to donors: samples arrive in large
# batches and one donor unknown to the store must not fail the batch.
idle_history = Table(
    "idle_history",
    metadata,
    Column("donor_id", String(64), primary_key=True),
    Column("hour_of_week", Integer(), primary_key=True),
    Column("seen_seconds", Float(), nullable=False),
    Column("idle_seconds", Float(), nullable=False),
)
