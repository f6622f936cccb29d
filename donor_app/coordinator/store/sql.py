"""`SqlStore`: the fleet store over SQLAlchemy Core, on SQLite or PostgreSQL.

One code path for both databases; where they differ (the upsert statement, SQLite's
locking) the difference is chosen here by dialect name.

Engines and their SQLite locking are in engine.py; rows <-> records in rows.py. At ~600
lines this is longer than most modules on purpose: it is one class implementing one port,
each method one transaction over the same few helpers, and the port's docstrings
(ports.py) are its table of contents; split by table, the compare-and-set and its event
would live apart.

Concurrency, SQLite: write transactions start with BEGIN IMMEDIATE (engine.py), so they
queue for the write lock instead of failing half-way; readers never wait under WAL.

Concurrency, PostgreSQL: READ COMMITTED. Read-then-write sequences lock the row first
(`SELECT ... FOR UPDATE`) or put the condition into the UPDATE's WHERE clause, which
PostgreSQL re-checks after waiting for a concurrent writer. Batches are applied in key
order so that two batches touching the same rows cannot deadlock.
"""

from __future__ import annotations

import hmac
import logging
import operator
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    Connection,
    Engine,
    Select,
    Table,
    bindparam,
    false,
    literal_column,
    select,
    update,
)
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.exc import DBAPIError, IntegrityError, SQLAlchemyError, StatementError

from donor_app.coordinator.store.engine import write_engine
from donor_app.coordinator.store.ports import AlreadyExists, Conflict, StoreError, TokenRefused
from donor_app.coordinator.store.rows import (
    HELD_VALUES,
    capacity_values,
    checkpoint_values,
    chunks,
    donor_from_row,
    event_from_row,
    event_values,
    require_aware,
    token_from_row,
    workload_from_row,
    workload_values,
)
from donor_app.coordinator.store.schema import (
    donors,
    idle_history,
    images,
    tokens,
    workload_events,
    workloads,
)
from donor_app.domain.records import (
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

if TYPE_CHECKING:
    from donor_app.coordinator.store.ports import Store

log = logging.getLogger(__name__)

# Ids per `IN (...)`: well below SQLite's 32766 and PostgreSQL's 65535 bound parameters.
_IN_CHUNK = 5_000
HOURS_PER_WEEK = 168


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
            require_aware(name, value)
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
        require_aware("created_at", token.created_at)
        require_aware("expires_at", token.expires_at)
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
        require_aware("now", now)
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
            return token_from_row(row, uses_left=row.uses_left - 1)

    # --- donors -----------------------------------------------------------------------

    def add_donor(self, donor: DonorRecord) -> None:
        require_aware("enrolled_at", donor.enrolled_at)
        values = {
            "donor_id": donor.donor_id,
            "hostname": donor.hostname,
            "cert_sha256": donor.cert_sha256,
            "enrolled_at": donor.enrolled_at,
            "last_seen": donor.last_seen,
            "drained": donor.drained,
            "revoked": donor.revoked,
            "lost": donor.lost,
            **capacity_values(donor.capacity),
        }
        with self._tx(write=True) as conn:
            if not self._insert_new(conn, donors, "donor_id", values):
                raise AlreadyExists(f"donor {donor.donor_id} exists")

    def get_donor(self, donor_id: str) -> DonorRecord | None:
        with self._tx(write=False) as conn:
            row = conn.execute(select(donors).where(donors.c.donor_id == donor_id)).one_or_none()
        return None if row is None else donor_from_row(row)

    def list_donors(self) -> list[DonorRecord]:
        """Ordered by enrollment time, then id."""
        with self._tx(write=False) as conn:
            rows = conn.execute(
                select(donors).order_by(donors.c.enrolled_at, donors.c.donor_id)
            ).all()
        return [donor_from_row(row) for row in rows]

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
            return donor_from_row(row)

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
            require_aware(name, getattr(workload, name))
        require_aware("event.at", event.at)
        values = workload_values(workload)  # checks the checkpoint before any write
        with self._tx(write=True) as conn:
            if not self._insert_new(conn, workloads, "workload_id", values):
                raise AlreadyExists(f"workload {workload.workload_id} exists")
            conn.execute(workload_events.insert().values(**event_values(event)))

    def get_workload(self, workload_id: str) -> WorkloadRecord | None:
        with self._tx(write=False) as conn:
            row = conn.execute(
                select(workloads).where(workloads.c.workload_id == workload_id)
            ).one_or_none()
        return None if row is None else workload_from_row(row)

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
        return [workload_from_row(row) for row in rows]

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
        require_aware("now", now)
        if lease_until is not None:
            require_aware("lease_until", lease_until)
        if event is not None:
            require_aware("event.at", event.at)
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
            values.update(checkpoint_values(checkpoint))
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
                conn.execute(workload_events.insert().values(**event_values(event)))
            return workload_from_row(row)

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
                workloads.c.state.in_([literal_column(f"'{v}'") for v in HELD_VALUES]),
            )
            .values(lease_until=bindparam("b_lease_until"))
        )
        with self._tx(write=True) as conn:
            # Both drivers sum rowcount over an executemany; the contract suite checks.
            return self._executemany(conn, stmt, rows)

    def expired_leases(self, now: datetime) -> list[WorkloadRecord]:
        """Oldest lease first."""
        require_aware("now", now)
        query = (
            select(workloads)
            .where(
                workloads.c.state.in_(HELD_VALUES),
                workloads.c.lease_until.is_not(None),
                workloads.c.lease_until < now,
            )
            .order_by(workloads.c.lease_until, workloads.c.workload_id)
        )
        with self._tx(write=False) as conn:
            rows = conn.execute(query).all()
        return [workload_from_row(row) for row in rows]

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
        return [event_from_row(row) for row in rows]

    # --- images -----------------------------------------------------------------------

    def add_image(self, image: ImageRecord) -> None:
        require_aware("added_at", image.added_at)
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
            for chunk in chunks(ids, _IN_CHUNK):
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
