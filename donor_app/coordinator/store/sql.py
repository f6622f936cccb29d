"""`SqlStore`: the fleet store over SQLAlchemy Core, on SQLite or PostgreSQL.

One code path for both databases; where they differ (the upsert statement, SQLite's
locking) the difference is chosen here by dialect name.

Concurrency, SQLite: Python's sqlite3 module would start transactions lazily at the
first write, so a transaction that reads and then writes can find that another
connection wrote in between and fail at once with "database is locked" (busy_timeout
does not apply to that case). We therefore let SQLAlchemy emit BEGIN itself
(`isolation_level = None` on the driver) and write transactions start with
`BEGIN IMMEDIATE`: they take the write lock first, queue behind each other for up to
`busy_timeout`, and never fail half-way. Read-only methods use a plain deferred BEGIN,
which under WAL never waits for writers.

Concurrency, PostgreSQL: READ COMMITTED. Read-then-write sequences lock the row first
(`SELECT ... FOR UPDATE`) or put the condition into the UPDATE's WHERE clause, which
PostgreSQL re-checks after waiting for a concurrent writer. Batches are applied in key
order so that two batches touching the same rows cannot deadlock.
"""

from __future__ import annotations

import hmac
import json
import logging
import operator
import re
import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    Connection,
    Engine,
    Row,
    Select,
    Table,
    bindparam,
    create_engine,
    event,
    false,
    literal_column,
    select,
    update,
)
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import DBAPIError, IntegrityError, SQLAlchemyError, StatementError

from donor_app.coordinator.store.ports import AlreadyExists, Conflict, StoreError, TokenRefused
from donor_app.coordinator.store.schema import (
    donors,
    idle_history,
    images,
    tokens,
    workload_events,
    workloads,
)
from donor_app.domain.records import (
    HELD_STATES,
    Capacity,
    CheckpointRef,
    DonorRecord,
    DonorSeen,
    IdleSample,
    ImageRecord,
    LeaseRenewal,
    TokenRecord,
    WorkloadEvent,
    WorkloadRecord,
    WorkloadState,
)
from donor_app.domain.vm import DiskBoot, KernelBoot, VmSpec

if TYPE_CHECKING:
    from donor_app.coordinator.store.ports import Store

log = logging.getLogger(__name__)

# How long a SQLite writer waits for the write lock before failing (StoreError).
SQLITE_BUSY_TIMEOUT_MS = 10_000
# Execution option read by the SQLite "begin" listener: start with BEGIN IMMEDIATE.
_SQLITE_IMMEDIATE = "donor_sqlite_immediate"
# Ids per `IN (...)`: well below SQLite's 32766 and PostgreSQL's 65535 bound parameters.
_IN_CHUNK = 5_000
HOURS_PER_WEEK = 168


# --- VmSpec <-> JSON ------------------------------------------------------------------


def vmspec_to_dict(spec: VmSpec) -> dict[str, Any]:
    """A VmSpec as plain JSON-able data; `boot.kind` tells KernelBoot from DiskBoot."""
    boot: dict[str, Any]
    if isinstance(spec.boot, KernelBoot):
        boot = {
            "kind": "kernel",
            "kernel_sha256": spec.boot.kernel_sha256,
            "initrd_sha256": spec.boot.initrd_sha256,
            "cmdline": spec.boot.cmdline,
        }
    else:
        boot = {"kind": "disk", "disk_sha256": spec.boot.disk_sha256}
    return {
        "name": spec.name,
        "vcpus": spec.vcpus,
        "memory_mib": spec.memory_mib,
        "network": spec.network,
        "arch": spec.arch,
        "boot": boot,
    }


def vmspec_from_dict(data: dict[str, Any]) -> VmSpec:
    """The inverse of `vmspec_to_dict`; VmSpec's own checks run. ValueError when the
    data is not a valid spec (a missing key, an unknown boot kind, a bad value)."""
    try:
        raw_boot = data["boot"]
        kind = raw_boot["kind"]
        boot: KernelBoot | DiskBoot
        if kind == "kernel":
            boot = KernelBoot(
                kernel_sha256=raw_boot["kernel_sha256"],
                initrd_sha256=raw_boot.get("initrd_sha256"),
                cmdline=raw_boot.get("cmdline", "console=ttyS0"),
            )
        elif kind == "disk":
            boot = DiskBoot(disk_sha256=raw_boot["disk_sha256"])
        else:
            raise ValueError(f"boot.kind: {kind!r} is not 'kernel' or 'disk'")
        return VmSpec(
            name=data["name"],
            vcpus=data["vcpus"],
            memory_mib=data["memory_mib"],
            boot=boot,
            network=data.get("network", False),
            arch=data.get("arch", "x86_64"),
        )
    except (KeyError, TypeError) as exc:
        raise ValueError(f"not a VmSpec: {exc!r}") from exc


def vmspec_to_json(spec: VmSpec) -> str:
    # sort_keys + compact separators: one spec always gives the same text.
    return json.dumps(vmspec_to_dict(spec), sort_keys=True, separators=(",", ":"))


def vmspec_from_json(text: str) -> VmSpec:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not a VmSpec: invalid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ValueError("not a VmSpec: JSON is not an object")
    return vmspec_from_dict(data)


# --- engines ----------------------------------------------------------------------------


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


# --- rows <-> records -----------------------------------------------------------------


def _require_aware(name: str, value: datetime) -> None:
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{name}: naive datetime {value!r}: the store keeps aware UTC times")


def _token(row: Row[Any], uses_left: int | None = None) -> TokenRecord:
    return TokenRecord(
        token_id=row.token_id,
        secret_sha256=row.secret_sha256,
        created_at=row.created_at,
        expires_at=row.expires_at,
        uses_left=row.uses_left if uses_left is None else uses_left,
        note=row.note,
    )


def _capacity_values(capacity: Capacity | None) -> dict[str, Any]:
    if capacity is None:
        return {
            "cap_cores": None,
            "cap_memory_mib": None,
            "cap_arch": None,
            "cap_lend_cpu_percent": None,
            "cap_lend_memory_mib": None,
            "cap_lend_until": None,
            "cap_idle": None,
        }
    return {
        "cap_cores": capacity.cores,
        "cap_memory_mib": capacity.memory_mib,
        "cap_arch": capacity.arch,
        "cap_lend_cpu_percent": capacity.lend_cpu_percent,
        "cap_lend_memory_mib": capacity.lend_memory_mib,
        "cap_lend_until": capacity.lend_until,
        "cap_idle": capacity.idle,
    }


def _donor(row: Row[Any]) -> DonorRecord:
    capacity = None
    if row.cap_cores is not None:
        capacity = Capacity(
            cores=row.cap_cores,
            memory_mib=row.cap_memory_mib,
            arch=row.cap_arch,
            lend_cpu_percent=row.cap_lend_cpu_percent,
            lend_memory_mib=row.cap_lend_memory_mib,
            lend_until=row.cap_lend_until,
            idle=bool(row.cap_idle),
        )
    return DonorRecord(
        donor_id=row.donor_id,
        hostname=row.hostname,
        cert_sha256=row.cert_sha256,
        enrolled_at=row.enrolled_at,
        capacity=capacity,
        last_seen=row.last_seen,
        drained=bool(row.drained),
        revoked=bool(row.revoked),
        lost=bool(row.lost),
    )


def _checkpoint_values(checkpoint: CheckpointRef | None) -> dict[str, Any]:
    """The checkpoint_* columns of a workload row (all None: no checkpoint).
    ValueError for a checkpoint the store would not give back as it was given."""
    if checkpoint is None:
        return {
            "checkpoint_sha256": None,
            "checkpoint_size": None,
            "checkpoint_epoch": None,
            "checkpoint_at": None,
            "checkpoint_donor_id": None,
        }
    # The columns hold 64 characters: PostgreSQL would refuse more, SQLite would not.
    if not _SHA256.fullmatch(checkpoint.sha256):
        raise ValueError(f"checkpoint.sha256: {checkpoint.sha256!r} is not 64 lowercase hex")
    if not 0 < len(checkpoint.donor_id) <= 64:
        raise ValueError(f"checkpoint.donor_id: {checkpoint.donor_id!r} is not 1–64 characters")
    if checkpoint.size < 0 or checkpoint.epoch < 0:
        raise ValueError(f"checkpoint {checkpoint.sha256}: negative size or epoch")
    _require_aware("checkpoint.taken_at", checkpoint.taken_at)
    return {
        "checkpoint_sha256": checkpoint.sha256,
        "checkpoint_size": checkpoint.size,
        "checkpoint_epoch": checkpoint.epoch,
        "checkpoint_at": checkpoint.taken_at,
        "checkpoint_donor_id": checkpoint.donor_id,
    }


def _checkpoint(row: Row[Any]) -> CheckpointRef | None:
    if row.checkpoint_sha256 is None:
        return None
    parts = (row.checkpoint_size, row.checkpoint_epoch, row.checkpoint_at, row.checkpoint_donor_id)
    if any(part is None for part in parts):
        # The store writes the five columns together; a partial one was edited by hand.
        raise StoreError(f"workload {row.workload_id}: stored checkpoint is incomplete")
    return CheckpointRef(
        sha256=row.checkpoint_sha256,
        size=row.checkpoint_size,
        epoch=row.checkpoint_epoch,
        taken_at=row.checkpoint_at,
        donor_id=row.checkpoint_donor_id,
    )


def _workload(row: Row[Any]) -> WorkloadRecord:
    try:
        spec = vmspec_from_json(row.spec)
    except ValueError as exc:
        raise StoreError(f"workload {row.workload_id}: stored spec is unreadable: {exc}") from exc
    return WorkloadRecord(
        workload_id=row.workload_id,
        spec=spec,
        priority=row.priority,
        state=WorkloadState(row.state),
        created_at=row.created_at,
        updated_at=row.updated_at,
        donor_id=row.donor_id,
        epoch=row.epoch,
        lease_until=row.lease_until,
        detail=row.detail,
        checkpoint=_checkpoint(row),
    )


def _workload_values(workload: WorkloadRecord) -> dict[str, Any]:
    return {
        "workload_id": workload.workload_id,
        "spec": vmspec_to_json(workload.spec),
        "priority": workload.priority,
        "state": workload.state.value,
        "created_at": workload.created_at,
        "updated_at": workload.updated_at,
        "donor_id": workload.donor_id,
        "epoch": workload.epoch,
        "lease_until": workload.lease_until,
        "detail": workload.detail,
        **_checkpoint_values(workload.checkpoint),
    }


def _event_values(ev: WorkloadEvent) -> dict[str, Any]:
    return {
        "workload_id": ev.workload_id,
        "at": ev.at,
        "kind": ev.kind,
        "donor_id": ev.donor_id,
        "epoch": ev.epoch,
        "detail": ev.detail,
    }


def _event(row: Row[Any]) -> WorkloadEvent:
    return WorkloadEvent(
        workload_id=row.workload_id,
        at=row.at,
        kind=row.kind,
        donor_id=row.donor_id,
        epoch=row.epoch,
        detail=row.detail,
    )


def _chunks(items: Sequence[str], size: int) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


_HELD_VALUES = sorted(state.value for state in HELD_STATES)
_SHA256 = re.compile(r"[0-9a-f]{64}")


# --- the store --------------------------------------------------------------------------


class SqlStore:
    """The fleet store (see `ports.Store` for the contract of each method).

    Thread-safe: every method checks a connection out of the engine's pool for one
    transaction. Database failures raise `StoreError`; a naive datetime or inconsistent
    arguments raise ValueError before anything is written.
    """

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._writer = write_engine(engine)
        self._dialect = engine.dialect.name
        self._sqlite = self._dialect == "sqlite"

    @property
    def engine(self) -> Engine:
        return self._engine

    @contextmanager
    def _tx(self, *, write: bool) -> Iterator[Connection]:
        """One transaction; database errors become StoreError, and a bad value that
        SQLAlchemy caught while binding parameters becomes its ValueError again."""
        try:
            with (self._writer if write else self._engine).begin() as conn:
                yield conn
        except IntegrityError as exc:
            raise StoreError(f"the database refused the change: {exc.orig}") from exc
        except DBAPIError as exc:
            raise StoreError(f"database error: {exc.orig}") from exc
        except StatementError as exc:
            if isinstance(exc.orig, ValueError):
                raise exc.orig from exc
            raise StoreError(f"database error: {exc}") from exc
        except SQLAlchemyError as exc:
            raise StoreError(f"database error: {exc}") from exc

    def _insert(self, table: Table) -> pg_dialect.Insert | sqlite_dialect.Insert:
        # Both dialects' insert() offer on_conflict_do_nothing/do_update with the same
        # arguments; the generic insert() does not.
        if self._dialect == "postgresql":
            return pg_dialect.insert(table)
        return sqlite_dialect.insert(table)

    def _insert_new(self, conn: Connection, table: Table, key: str, values: dict[str, Any]) -> bool:
        """Insert unless the primary key exists; True when inserted."""
        # RETURNING rather than rowcount: SQLAlchemy does not promise an INSERT's
        # rowcount (psycopg reports -1 here).
        stmt = (
            self._insert(table)
            .values(**values)
            .on_conflict_do_nothing(index_elements=[key])
            .returning(table.c[key])
        )
        return conn.execute(stmt).first() is not None

    def _db_time(self, name: str, value: datetime | None) -> Any:
        """A datetime as the driver takes it, for `_executemany` (which skips
        SQLAlchemy's bind processing): the same conversion UtcDateTime does."""
        if value is None:
            return None
        if value.tzinfo is not UTC:  # the common case skips the checks (10,000s a second)
            _require_aware(name, value)
            value = value.astimezone(UTC)
        if self._sqlite:
            # SQLAlchemy's SQLite DATETIME storage format (fixed width, microseconds),
            # as UtcDateTime stores it: "YYYY-MM-DD HH:MM:SS.ffffff" without the offset.
            return value.isoformat(" ", "microseconds")[:26]
        return value

    def _executemany(
        self,
        conn: Connection,
        stmt: Any,
        rows: list[dict[str, Any]],
        column_keys: list[str] | None = None,
    ) -> int:
        """Run `stmt` once per row through the driver's executemany; the rowcount sum.

        Why not `conn.execute(stmt, rows)`: SQLAlchemy then builds and processes every
        row's parameters in Python: record_seen of 10,000 donors took ~250 ms on SQLite
        that way and ~70 ms this way (the driver's own executemany: ~20 ms). The
        statement is still written and compiled by SQLAlchemy; the rows must hold
        driver-ready values (see `_db_time`).
        """
        compiled = stmt.compile(dialect=conn.dialect, column_keys=column_keys)
        params: list[Any]
        if compiled.positional:
            order = compiled.positiontup or []
            pick = operator.itemgetter(*order)
            params = (
                [pick(row) for row in rows] if len(order) > 1 else [(pick(row),) for row in rows]
            )
        else:
            params = rows
        return int(conn.exec_driver_sql(compiled.string, params).rowcount)

    # --- enrollment tokens ------------------------------------------------------------

    def add_token(self, token: TokenRecord) -> None:
        _require_aware("created_at", token.created_at)
        _require_aware("expires_at", token.expires_at)
        values = {
            "token_id": token.token_id,
            "secret_sha256": token.secret_sha256,
            "created_at": token.created_at,
            "expires_at": token.expires_at,
            "uses_left": token.uses_left,
            "note": token.note,
        }
        with self._tx(write=True) as conn:
            if not self._insert_new(conn, tokens, "token_id", values):
                raise AlreadyExists(f"token {token.token_id} exists")

    def use_token(self, token_id: str, secret_sha256: str, now: datetime) -> TokenRecord:
        """Returns the token as it is after this use (uses_left already decremented).
        A wrong secret is refused as "unknown": a caller learns nothing about which
        token ids exist."""
        _require_aware("now", now)
        with self._tx(write=True) as conn:
            # FOR UPDATE: concurrent enrollments queue on the row (PostgreSQL); SQLite
            # renders no FOR UPDATE and the BEGIN IMMEDIATE lock does the same job.
            row = conn.execute(
                select(tokens).where(tokens.c.token_id == token_id).with_for_update()
            ).one_or_none()
            if row is None or not hmac.compare_digest(
                row.secret_sha256.encode(), secret_sha256.encode()
            ):
                raise TokenRefused("unknown")
            if row.expires_at <= now:
                raise TokenRefused("expired")
            if row.uses_left <= 0:
                raise TokenRefused("used")
            # The WHERE repeats the checks: belt and braces should the lock ever be lost.
            done = conn.execute(
                update(tokens)
                .where(tokens.c.token_id == token_id, tokens.c.uses_left > 0)
                .values(uses_left=tokens.c.uses_left - 1)
            ).rowcount
            if done != 1:
                raise TokenRefused("used")
            return _token(row, uses_left=row.uses_left - 1)

    # --- donors -----------------------------------------------------------------------

    def add_donor(self, donor: DonorRecord) -> None:
        _require_aware("enrolled_at", donor.enrolled_at)
        values = {
            "donor_id": donor.donor_id,
            "hostname": donor.hostname,
            "cert_sha256": donor.cert_sha256,
            "enrolled_at": donor.enrolled_at,
            "last_seen": donor.last_seen,
            "drained": donor.drained,
            "revoked": donor.revoked,
            "lost": donor.lost,
            **_capacity_values(donor.capacity),
        }
        with self._tx(write=True) as conn:
            if not self._insert_new(conn, donors, "donor_id", values):
                raise AlreadyExists(f"donor {donor.donor_id} exists")

    def get_donor(self, donor_id: str) -> DonorRecord | None:
        with self._tx(write=False) as conn:
            row = conn.execute(select(donors).where(donors.c.donor_id == donor_id)).one_or_none()
        return None if row is None else _donor(row)

    def list_donors(self) -> list[DonorRecord]:
        """Ordered by enrollment time, then id."""
        with self._tx(write=False) as conn:
            rows = conn.execute(
                select(donors).order_by(donors.c.enrolled_at, donors.c.donor_id)
            ).all()
        return [_donor(row) for row in rows]

    def set_donor_flags(
        self,
        donor_id: str,
        *,
        drained: bool | None = None,
        revoked: bool | None = None,
        lost: bool | None = None,
    ) -> DonorRecord:
        changes = {
            name: value
            for name, value in (("drained", drained), ("revoked", revoked), ("lost", lost))
            if value is not None
        }
        with self._tx(write=True) as conn:
            stmt: Any
            if changes:
                stmt = (
                    update(donors)
                    .where(donors.c.donor_id == donor_id)
                    .values(**changes)
                    .returning(*donors.c)
                )
            else:
                stmt = select(donors).where(donors.c.donor_id == donor_id)
            row = conn.execute(stmt).one_or_none()
            if row is None:
                raise KeyError(donor_id)
            return _donor(row)

    def record_seen(self, seen: Sequence[DonorSeen]) -> None:
        """One executemany UPDATE; a donor listed twice ends with its last report."""
        if not seen:
            return
        # Stable sort: the key order avoids deadlocks between concurrent batches on
        # PostgreSQL and keeps a donor's reports in their given order.
        rows = []
        for item in sorted(seen, key=lambda s: s.donor_id):
            cap = item.capacity
            rows.append(
                {
                    "b_donor_id": item.donor_id,
                    "b_last_seen": self._db_time("last_seen", item.last_seen),
                    "b_cores": cap.cores,
                    "b_memory_mib": cap.memory_mib,
                    "b_arch": cap.arch,
                    "b_lend_cpu_percent": float(cap.lend_cpu_percent),
                    "b_lend_memory_mib": cap.lend_memory_mib,
                    "b_lend_until": self._db_time("capacity.lend_until", cap.lend_until),
                    "b_idle": bool(cap.idle),
                }
            )
        stmt = (
            update(donors)
            .where(donors.c.donor_id == bindparam("b_donor_id"))
            .values(
                last_seen=bindparam("b_last_seen"),
                cap_cores=bindparam("b_cores"),
                cap_memory_mib=bindparam("b_memory_mib"),
                cap_arch=bindparam("b_arch"),
                cap_lend_cpu_percent=bindparam("b_lend_cpu_percent"),
                cap_lend_memory_mib=bindparam("b_lend_memory_mib"),
                cap_lend_until=bindparam("b_lend_until"),
                cap_idle=bindparam("b_idle"),
                lost=false(),
            )
        )
        with self._tx(write=True) as conn:
            self._executemany(conn, stmt, rows)

    # --- workloads --------------------------------------------------------------------

    def add_workload(self, workload: WorkloadRecord, event: WorkloadEvent) -> None:
        if event.workload_id != workload.workload_id:
            raise ValueError(
                f"event.workload_id {event.workload_id!r} is not {workload.workload_id!r}"
            )
        for name in ("created_at", "updated_at"):
            _require_aware(name, getattr(workload, name))
        _require_aware("event.at", event.at)
        values = _workload_values(workload)  # checks the checkpoint before any write
        with self._tx(write=True) as conn:
            if not self._insert_new(conn, workloads, "workload_id", values):
                raise AlreadyExists(f"workload {workload.workload_id} exists")
            conn.execute(workload_events.insert().values(**_event_values(event)))

    def get_workload(self, workload_id: str) -> WorkloadRecord | None:
        with self._tx(write=False) as conn:
            row = conn.execute(
                select(workloads).where(workloads.c.workload_id == workload_id)
            ).one_or_none()
        return None if row is None else _workload(row)

    def list_workloads(
        self, states: Iterable[WorkloadState] | None = None, donor_id: str | None = None
    ) -> list[WorkloadRecord]:
        """Ordered by priority (highest first), then created_at, then id. An empty
        `states` matches nothing."""
        query: Select[Any] = select(workloads)
        if states is not None:
            query = query.where(workloads.c.state.in_(sorted({s.value for s in states})))
        if donor_id is not None:
            query = query.where(workloads.c.donor_id == donor_id)
        query = query.order_by(
            workloads.c.priority.desc(), workloads.c.created_at, workloads.c.workload_id
        )
        with self._tx(write=False) as conn:
            rows = conn.execute(query).all()
        return [_workload(row) for row in rows]

    def update_workload(
        self,
        workload_id: str,
        *,
        expected_epoch: int,
        event: WorkloadEvent | None = None,
        state: WorkloadState | None = None,
        donor_id: str | None = None,
        clear_donor: bool = False,
        epoch: int | None = None,
        lease_until: datetime | None = None,
        detail: str | None = None,
        checkpoint: CheckpointRef | None = None,
        clear_checkpoint: bool = False,
        now: datetime,
    ) -> WorkloadRecord:
        """See the port. `clear_donor` also clears `lease_until`: a lease binds a donor,
        and none is left (so a lease cannot be set in the same call)."""
        if clear_donor and donor_id is not None:
            raise ValueError("donor_id and clear_donor are exclusive")
        if clear_checkpoint and checkpoint is not None:
            raise ValueError("checkpoint and clear_checkpoint are exclusive")
        if clear_donor and lease_until is not None:
            raise ValueError("lease_until and clear_donor are exclusive")
        if event is not None and event.workload_id != workload_id:
            raise ValueError(f"event.workload_id {event.workload_id!r} is not {workload_id!r}")
        _require_aware("now", now)
        if lease_until is not None:
            _require_aware("lease_until", lease_until)
        if event is not None:
            _require_aware("event.at", event.at)
        values: dict[str, Any] = {"updated_at": now}
        if state is not None:
            values["state"] = WorkloadState(state).value
        if donor_id is not None:
            values["donor_id"] = donor_id
        if clear_donor:
            values["donor_id"] = None
            values["lease_until"] = None
        if epoch is not None:
            values["epoch"] = epoch
        if lease_until is not None:
            values["lease_until"] = lease_until
        if detail is not None:
            values["detail"] = detail
        if checkpoint is not None or clear_checkpoint:
            values.update(_checkpoint_values(checkpoint))
        with self._tx(write=True) as conn:
            # The epoch test sits in the UPDATE itself: PostgreSQL re-checks it after
            # waiting for a concurrent writer, so two CAS on one epoch cannot both win.
            row = conn.execute(
                update(workloads)
                .where(
                    workloads.c.workload_id == workload_id,
                    workloads.c.epoch == expected_epoch,
                )
                .values(**values)
                .returning(*workloads.c)
            ).one_or_none()
            if row is None:
                stored = conn.execute(
                    select(workloads.c.epoch).where(workloads.c.workload_id == workload_id)
                ).scalar_one_or_none()
                if stored is None:
                    raise KeyError(workload_id)
                raise Conflict(
                    f"workload {workload_id}: epoch is {stored}, expected {expected_epoch}"
                )
            if event is not None:
                conn.execute(workload_events.insert().values(**_event_values(event)))
            return _workload(row)

    def renew_leases(self, renewals: Sequence[LeaseRenewal]) -> int:
        """Only workloads in a held state have a lease to extend; a renewal for a
        queued or finished workload does not match even with the same donor and epoch.
        A lease is set to the renewal's `lease_until` (the last renewal wins)."""
        if not renewals:
            return 0
        rows = [
            {
                "b_workload_id": item.workload_id,
                "b_donor_id": item.donor_id,
                "b_epoch": item.epoch,
                "b_lease_until": self._db_time("lease_until", item.lease_until),
            }
            for item in sorted(renewals, key=lambda r: r.workload_id)  # lock order (PG)
        ]
        stmt = (
            update(workloads)
            .where(
                workloads.c.workload_id == bindparam("b_workload_id"),
                workloads.c.donor_id == bindparam("b_donor_id"),
                workloads.c.epoch == bindparam("b_epoch"),
                # Literal values: executemany cannot take an expanding IN parameter.
                workloads.c.state.in_([literal_column(f"'{v}'") for v in _HELD_VALUES]),
            )
            .values(lease_until=bindparam("b_lease_until"))
        )
        with self._tx(write=True) as conn:
            # Both drivers sum rowcount over an executemany; the contract suite checks.
            return self._executemany(conn, stmt, rows)

    def expired_leases(self, now: datetime) -> list[WorkloadRecord]:
        """Oldest lease first."""
        _require_aware("now", now)
        query = (
            select(workloads)
            .where(
                workloads.c.state.in_(_HELD_VALUES),
                workloads.c.lease_until.is_not(None),
                workloads.c.lease_until < now,
            )
            .order_by(workloads.c.lease_until, workloads.c.workload_id)
        )
        with self._tx(write=False) as conn:
            rows = conn.execute(query).all()
        return [_workload(row) for row in rows]

    def workload_events(self, workload_id: str) -> list[WorkloadEvent]:
        """Oldest first by `at`; events with the same time in the order they were
        added."""
        query = (
            select(workload_events)
            .where(workload_events.c.workload_id == workload_id)
            .order_by(workload_events.c.at, workload_events.c.event_id)
        )
        with self._tx(write=False) as conn:
            rows = conn.execute(query).all()
        return [_event(row) for row in rows]

    # --- images -----------------------------------------------------------------------

    def add_image(self, image: ImageRecord) -> None:
        _require_aware("added_at", image.added_at)
        values = {"sha256": image.sha256, "size": image.size, "added_at": image.added_at}
        with self._tx(write=True) as conn:
            self._insert_new(conn, images, "sha256", values)

    def get_image(self, sha256: str) -> ImageRecord | None:
        with self._tx(write=False) as conn:
            row = conn.execute(select(images).where(images.c.sha256 == sha256)).one_or_none()
        if row is None:
            return None
        return ImageRecord(sha256=row.sha256, size=row.size, added_at=row.added_at)

    # --- idle history -----------------------------------------------------------------

    def add_idle_samples(self, samples: Sequence[IdleSample]) -> None:
        """Samples of donors the store does not know are kept too (harmless: ratios
        are only asked for known donors). ValueError for an hour outside 0–167 or a
        negative number of seconds."""
        if not samples:
            return
        # Pre-sum repeated keys: PostgreSQL refuses an upsert that touches one row
        # twice in a statement, and it is one row less to write anyway.
        sums: dict[tuple[str, int], list[float]] = {}
        for sample in samples:
            if not 0 <= sample.hour_of_week < HOURS_PER_WEEK:
                raise ValueError(f"hour_of_week: {sample.hour_of_week} is not in 0–167")
            if sample.seen_seconds < 0 or sample.idle_seconds < 0:
                raise ValueError(f"idle sample of {sample.donor_id}: negative seconds")
            acc = sums.setdefault((sample.donor_id, sample.hour_of_week), [0.0, 0.0])
            acc[0] += sample.seen_seconds
            acc[1] += sample.idle_seconds
        params = [
            {
                "donor_id": donor_id,
                "hour_of_week": hour,
                "seen_seconds": seen_s,
                "idle_seconds": idle_s,
            }
            for (donor_id, hour), (seen_s, idle_s) in sorted(sums.items())  # lock order
        ]
        stmt = self._insert(idle_history)
        stmt = stmt.on_conflict_do_update(
            index_elements=[idle_history.c.donor_id, idle_history.c.hour_of_week],
            set_={
                "seen_seconds": idle_history.c.seen_seconds + stmt.excluded.seen_seconds,
                "idle_seconds": idle_history.c.idle_seconds + stmt.excluded.idle_seconds,
            },
        )
        with self._tx(write=True) as conn:
            self._executemany(conn, stmt, params, column_keys=list(params[0]))

    def idle_ratios(self, donor_ids: Iterable[str], hour_of_week: int) -> dict[str, float]:
        ids = sorted(set(donor_ids))
        ratios: dict[str, float] = {}
        if not ids:
            return ratios
        with self._tx(write=False) as conn:
            for chunk in _chunks(ids, _IN_CHUNK):
                rows = conn.execute(
                    select(
                        idle_history.c.donor_id,
                        idle_history.c.seen_seconds,
                        idle_history.c.idle_seconds,
                    ).where(
                        idle_history.c.hour_of_week == hour_of_week,
                        idle_history.c.donor_id.in_(chunk),
                        idle_history.c.seen_seconds > 0,
                    )
                ).all()
                for row in rows:
                    ratios[row.donor_id] = float(row.idle_seconds) / float(row.seen_seconds)
        return ratios

    def close(self) -> None:
        self._engine.dispose()


if TYPE_CHECKING:

    def _conforms(store: SqlStore) -> Store:
        # mypy proves SqlStore implements the port.
        return store
