"""The fleet store's contract, run against the in-memory store, SQLite and a private
PostgreSQL server.

Every test of the port runs three times: `store` is an empty InMemoryStore, a SqlStore
on a fresh SQLite file, or a SqlStore on a fresh database of one PostgreSQL server
started for the session. The tests of SQL itself (migrations, reopening, connection
settings) take `sql_store` or `store_url` and run on the two databases only. Never
skipped: without the PostgreSQL binaries the session fixture fails and says what to
install.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import fields, is_dataclass, replace
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import TypeVar

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import func, inspect, select

from donor_app.coordinator.store import (
    AlreadyExists,
    Conflict,
    InMemoryStore,
    SqlStore,
    Store,
    StoreError,
    TokenRefused,
    default_sqlite_url,
    open_store,
)
from donor_app.coordinator.store.engine import make_engine
from donor_app.coordinator.store.migrate import (
    alembic_config,
    current_revision,
    head_revision,
    upgrade,
)
from donor_app.coordinator.store.rows import vmspec_to_json
from donor_app.coordinator.store.schema import donors as donors_table
from donor_app.coordinator.store.schema import metadata, tokens, workloads
from donor_app.domain.records import (
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
from tests.postgres import fresh_database, running_postgres

T0 = datetime(2025, 3, 4, 5, 6, 7, 123456, tzinfo=UTC)
SHA_A = "a" * 64
SHA_B = "b" * 64
SHA_C = "c" * 64
THREADS = 8
SQL_BACKENDS = ["sqlite", "postgresql"]

R = TypeVar("R")


# --- fixtures -------------------------------------------------------------------------


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One private PostgreSQL server for the whole session (its admin URL)."""
    with running_postgres(tmp_path_factory.mktemp("postgres")) as url:
        yield url


@contextmanager
def empty_database(request: pytest.FixtureRequest, backend: str) -> Iterator[str]:
    """A URL of an empty database: a SQLite file, or a new database on the server."""
    if backend == "sqlite":
        tmp_path: Path = request.getfixturevalue("tmp_path")
        yield f"sqlite:///{tmp_path / 'fleet.db'}"
        return
    server: str = request.getfixturevalue("postgres_server")
    with fresh_database(server) as url:
        yield url


@contextmanager
def opened_store(url: str) -> Iterator[SqlStore]:
    opened = open_store(url)
    try:
        yield opened
    finally:
        opened.close()


@pytest.fixture(params=SQL_BACKENDS)
def store_url(request: pytest.FixtureRequest) -> Iterator[str]:
    with empty_database(request, request.param) as url:
        yield url


@pytest.fixture
def sql_store(store_url: str) -> Iterator[SqlStore]:
    """A SqlStore on the empty database at `store_url`."""
    with opened_store(store_url) as opened:
        yield opened


@pytest.fixture(params=["memory", *SQL_BACKENDS])
def store(request: pytest.FixtureRequest) -> Iterator[Store]:
    """An empty store of each implementation of the port."""
    if request.param == "memory":
        yield InMemoryStore()
        return
    with empty_database(request, request.param) as url, opened_store(url) as opened:
        yield opened


# --- helpers --------------------------------------------------------------------------


def token(
    token_id: str = "tok1", uses: int = 1, ttl: timedelta = timedelta(hours=1)
) -> TokenRecord:
    return TokenRecord(
        token_id=token_id,
        secret_sha256=SHA_A,
        created_at=T0,
        expires_at=T0 + ttl,
        uses_left=uses,
        note="for the lab",
    )


def capacity(cores: int = 8, idle: bool = True) -> Capacity:
    return Capacity(
        cores=cores,
        memory_mib=32768,
        arch="x86_64",
        lend_cpu_percent=62.5,
        lend_memory_mib=8192,
        lend_until=T0 + timedelta(hours=9, microseconds=7),
        idle=idle,
    )


def donor(donor_id: str, *, enrolled: timedelta = timedelta(0), **kw: object) -> DonorRecord:
    return DonorRecord(
        donor_id=donor_id,
        hostname=f"{donor_id}.example.org",
        cert_sha256=SHA_B,
        enrolled_at=T0 + enrolled,
        **kw,  # type: ignore[arg-type]
    )


def spec(name: str = "guest", disk: bool = False) -> VmSpec:
    boot: KernelBoot | DiskBoot = (
        DiskBoot(disk_sha256=SHA_C)
        if disk
        else KernelBoot(kernel_sha256=SHA_A, initrd_sha256=SHA_B, cmdline="console=ttyS0 quiet")
    )
    return VmSpec(name=name, vcpus=2, memory_mib=256, boot=boot, network=True)


def workload(
    workload_id: str,
    *,
    priority: int = 0,
    created: timedelta = timedelta(0),
    state: WorkloadState = WorkloadState.QUEUED,
    donor_id: str | None = None,
    epoch: int = 0,
    lease_until: datetime | None = None,
) -> WorkloadRecord:
    return WorkloadRecord(
        workload_id=workload_id,
        spec=spec(workload_id),
        priority=priority,
        state=state,
        created_at=T0 + created,
        updated_at=T0 + created,
        donor_id=donor_id,
        epoch=epoch,
        lease_until=lease_until,
    )


def checkpoint_ref(
    sha256: str = SHA_A, *, epoch: int = 1, donor_id: str = "d1", taken: timedelta = timedelta(0)
) -> CheckpointRef:
    return CheckpointRef(
        sha256=sha256,
        size=3 * 1024 * 1024 * 1024 + 7,  # more than 32 bits
        epoch=epoch,
        taken_at=T0 + timedelta(minutes=5, microseconds=42) + taken,
        donor_id=donor_id,
    )


def submitted(w: WorkloadRecord) -> WorkloadEvent:
    return WorkloadEvent(workload_id=w.workload_id, at=w.created_at, kind="submitted")


def add_workloads(store: Store, *records: WorkloadRecord) -> None:
    for record in records:
        store.add_workload(record, submitted(record))


def race(n: int, call: Callable[[], R]) -> list[R | BaseException]:
    """Run `call` in n threads released together; each one's result or exception."""
    barrier = threading.Barrier(n)

    def one() -> R | BaseException:
        barrier.wait(timeout=30)
        try:
            return call()
        except Exception as exc:
            return exc

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(lambda _: one(), range(n)))


def uses_remaining(store: Store, token_id: str, now: datetime = T0) -> int:
    """How many more uses the token gives, seen through the port: spends them all, so
    it is a test's last look at the token."""
    count = 0
    while True:
        try:
            store.use_token(token_id, SHA_A, now)
        except TokenRefused as refused:
            assert refused.reason == "used", refused
            return count
        count += 1
        assert count <= 100, "the token does not run out"


def stored_uses_left(store: SqlStore, token_id: str) -> int:
    """The token's row as the database holds it."""
    with store.engine.connect() as conn:
        value = conn.execute(
            select(tokens.c.uses_left).where(tokens.c.token_id == token_id)
        ).scalar_one()
    return int(value)


# --- enrollment tokens ----------------------------------------------------------------


def test_single_use_token_is_refused_the_second_time(store: Store) -> None:
    store.add_token(token(uses=1))
    used = store.use_token("tok1", SHA_A, T0 + timedelta(minutes=1))
    assert used == replace(token(uses=1), uses_left=0)
    with pytest.raises(TokenRefused) as refused:
        store.use_token("tok1", SHA_A, T0 + timedelta(minutes=2))
    assert refused.value.reason == "used"
    assert uses_remaining(store, "tok1") == 0


def test_token_with_n_uses_gives_exactly_n(store: Store) -> None:
    store.add_token(token(uses=3))
    got = [store.use_token("tok1", SHA_A, T0).uses_left for _ in range(3)]
    assert got == [2, 1, 0]
    with pytest.raises(TokenRefused, match="used"):
        store.use_token("tok1", SHA_A, T0)


def test_expired_token_is_refused_and_unchanged(store: Store) -> None:
    store.add_token(token(uses=2, ttl=timedelta(hours=1)))
    for now in (T0 + timedelta(hours=1), T0 + timedelta(days=3)):  # expiry is exclusive
        with pytest.raises(TokenRefused) as refused:
            store.use_token("tok1", SHA_A, now)
        assert refused.value.reason == "expired"
    # One microsecond before the end it still works, with both uses left.
    last_moment = T0 + timedelta(hours=1) - timedelta(microseconds=1)
    assert store.use_token("tok1", SHA_A, last_moment).uses_left == 1
    assert uses_remaining(store, "tok1", last_moment) == 1


def test_unknown_token_and_wrong_secret_are_both_unknown(store: Store) -> None:
    store.add_token(token(uses=1))
    for token_id, secret in (("nope", SHA_A), ("tok1", SHA_B), ("tok1", "")):
        with pytest.raises(TokenRefused) as refused:
            store.use_token(token_id, secret, T0)
        assert refused.value.reason == "unknown"
    assert store.use_token("tok1", SHA_A, T0).uses_left == 0  # its one use is still there


def test_used_up_token_refusal_leaves_it_unchanged(store: Store) -> None:
    store.add_token(token(uses=0))
    with pytest.raises(TokenRefused, match="used"):
        store.use_token("tok1", SHA_A, T0)
    assert uses_remaining(store, "tok1") == 0


def test_concurrent_use_of_single_use_token_has_one_winner(store: Store) -> None:
    store.add_token(token(uses=1))
    results = race(THREADS, lambda: store.use_token("tok1", SHA_A, T0))
    winners = [r for r in results if isinstance(r, TokenRecord)]
    losers = [r for r in results if isinstance(r, TokenRefused)]
    assert len(winners) == 1, results
    assert len(losers) == THREADS - 1, results
    assert {r.reason for r in losers} == {"used"}
    assert uses_remaining(store, "tok1") == 0


def test_concurrent_use_of_three_use_token_has_three_winners(store: Store) -> None:
    store.add_token(token(uses=3))
    results = race(THREADS, lambda: store.use_token("tok1", SHA_A, T0))
    winners = sorted(r.uses_left for r in results if isinstance(r, TokenRecord))
    assert winners == [0, 1, 2], results
    assert all(isinstance(r, TokenRefused) for r in results if not isinstance(r, TokenRecord))


def test_adding_a_known_token_id_is_refused(store: Store) -> None:
    store.add_token(token(uses=1))
    with pytest.raises(AlreadyExists):
        store.add_token(token(uses=5))
    assert uses_remaining(store, "tok1") == 1


# --- donors ---------------------------------------------------------------------------


def test_donors_add_get_and_list(store: Store) -> None:
    bare = donor("d2", enrolled=timedelta(seconds=1))
    full = donor(
        "d1",
        enrolled=timedelta(seconds=2),
        capacity=capacity(),
        last_seen=T0 + timedelta(seconds=3),
        drained=True,
        lost=True,
    )
    early = donor("d3")
    for record in (bare, full, early):
        store.add_donor(record)
    assert store.get_donor("d1") == full
    assert store.get_donor("d2") == bare
    assert store.get_donor("zz") is None
    assert store.list_donors() == [early, bare, full]  # by enrollment time
    with pytest.raises(AlreadyExists):
        store.add_donor(donor("d1"))
    assert store.get_donor("d1") == full


def test_capacity_without_lend_until_round_trips(store: Store) -> None:
    record = donor("d1", capacity=replace(capacity(idle=False), lend_until=None))
    store.add_donor(record)
    assert store.get_donor("d1") == record


def test_set_donor_flags_changes_only_what_is_given(store: Store) -> None:
    store.add_donor(donor("d1", capacity=capacity()))
    store.add_donor(donor("d2"))
    drained = store.set_donor_flags("d1", drained=True)
    assert (drained.drained, drained.revoked, drained.lost) == (True, False, False)
    both = store.set_donor_flags("d1", revoked=True, lost=True)
    assert (both.drained, both.revoked, both.lost) == (True, True, True)
    undrained = store.set_donor_flags("d1", drained=False)
    assert (undrained.drained, undrained.revoked, undrained.lost) == (False, True, True)
    assert store.set_donor_flags("d1") == undrained
    assert store.get_donor("d1") == undrained
    assert undrained.capacity == capacity()
    assert store.get_donor("d2") == donor("d2")
    with pytest.raises(KeyError):
        store.set_donor_flags("nope", drained=True)
    with pytest.raises(KeyError):
        store.set_donor_flags("nope")


def test_record_seen_updates_known_donors_clears_lost_and_ignores_unknown(
    store: Store,
) -> None:
    store.add_donor(donor("d1", lost=True, drained=True))
    store.add_donor(donor("d2", capacity=capacity(cores=2)))
    store.add_donor(donor("d3"))
    later = T0 + timedelta(minutes=5, microseconds=999999)
    store.record_seen(
        [
            DonorSeen("d2", later, replace(capacity(cores=16, idle=False), lend_until=None)),
            DonorSeen("ghost", later, capacity()),
            DonorSeen("d1", later - timedelta(seconds=1), capacity(cores=4)),
            DonorSeen("d1", later, capacity(cores=6)),  # the last report of d1 wins
        ]
    )
    d1 = store.get_donor("d1")
    assert d1 == donor("d1", drained=True, lost=False, last_seen=later, capacity=capacity(6))
    assert store.get_donor("d2") == donor(
        "d2", last_seen=later, capacity=replace(capacity(cores=16, idle=False), lend_until=None)
    )
    assert store.get_donor("d3") == donor("d3")
    assert store.get_donor("ghost") is None
    store.record_seen([])


def test_record_seen_large_batch(store: Store) -> None:
    ids = [f"d{i:05d}" for i in range(120)]
    for donor_id in ids:
        store.add_donor(donor(donor_id, lost=True))
    seen_at = T0 + timedelta(seconds=30)
    batch = [DonorSeen(donor_id, seen_at, capacity(cores=i + 1)) for i, donor_id in enumerate(ids)]
    batch += [DonorSeen(f"x{i}", seen_at, capacity()) for i in range(3000)]  # unknown
    store.record_seen(batch)
    donors = store.list_donors()
    assert [d.capacity.cores if d.capacity else None for d in donors] == list(range(1, 121))
    assert all(d.last_seen == seen_at and not d.lost for d in donors)


# --- workloads ------------------------------------------------------------------------


def test_workloads_add_get_and_event(store: Store) -> None:
    kernel = workload("w1")
    disk = replace(workload("w2"), spec=spec("disk-guest", disk=True), detail="hello")
    add_workloads(store, kernel, disk)
    assert store.get_workload("w1") == kernel
    assert store.get_workload("w2") == disk
    assert store.get_workload("nope") is None
    assert store.workload_events("w1") == [submitted(kernel)]
    with pytest.raises(AlreadyExists):
        store.add_workload(replace(kernel, priority=9), submitted(kernel))
    assert store.get_workload("w1") == kernel
    assert store.workload_events("w1") == [submitted(kernel)]  # no second event


def test_add_workload_refuses_an_event_of_another_workload(store: Store) -> None:
    with pytest.raises(ValueError, match="workload_id"):
        store.add_workload(workload("w1"), submitted(workload("w2")))
    assert store.get_workload("w1") is None


def test_workload_on_an_unknown_donor_is_refused(store: Store) -> None:
    """A workload's donor must be enrolled: a foreign key on both databases (SQLite
    needs a pragma for that), a check in the in-memory store."""
    held = workload("w1", state=WorkloadState.ASSIGNED, donor_id="ghost", epoch=1)
    with pytest.raises(StoreError):
        store.add_workload(held, submitted(held))
    assert store.get_workload("w1") is None
    assert store.workload_events("w1") == []


def test_update_workload_to_an_unknown_donor_is_refused(store: Store) -> None:
    store.add_donor(donor("d1"))
    original = workload("w1")
    add_workloads(store, original)
    placed = WorkloadEvent("w1", T0, "placed", donor_id="ghost", epoch=1)
    with pytest.raises(StoreError):
        store.update_workload(
            "w1",
            expected_epoch=0,
            event=placed,
            state=WorkloadState.ASSIGNED,
            donor_id="ghost",
            epoch=1,
            now=T0 + timedelta(seconds=1),
        )
    # The epoch is compared first: a stale caller learns of the conflict.
    with pytest.raises(Conflict):
        store.update_workload("w1", expected_epoch=7, donor_id="ghost", now=T0)
    assert store.get_workload("w1") == original
    assert store.workload_events("w1") == [submitted(original)]


def test_list_workloads_order_and_filters(store: Store) -> None:
    store.add_donor(donor("d1"))
    store.add_donor(donor("d2"))
    low_old = workload("w-low-old", priority=1, created=timedelta(seconds=1))
    low_new = workload("w-low-new", priority=1, created=timedelta(seconds=5))
    high = workload(
        "w-high",
        priority=10,
        created=timedelta(seconds=9),
        state=WorkloadState.RUNNING,
        donor_id="d1",
        epoch=1,
        lease_until=T0,
    )
    negative = workload(
        "w-neg", priority=-5, state=WorkloadState.PAUSED, donor_id="d2", epoch=3, lease_until=T0
    )
    done = workload("w-done", priority=3, state=WorkloadState.CANCELLED)
    add_workloads(store, low_new, negative, done, high, low_old)

    assert store.list_workloads() == [high, done, low_old, low_new, negative]
    assert store.list_workloads(states=[WorkloadState.QUEUED]) == [low_old, low_new]
    held = {WorkloadState.RUNNING, WorkloadState.PAUSED}
    assert store.list_workloads(states=held) == [high, negative]
    assert store.list_workloads(states=iter(held)) == [high, negative]  # any iterable
    assert store.list_workloads(donor_id="d2") == [negative]
    assert store.list_workloads(states=[WorkloadState.RUNNING], donor_id="d2") == []
    assert store.list_workloads(states=[]) == []
    assert store.list_workloads(donor_id="ghost") == []


def test_update_workload_sets_fields_and_appends_event(store: Store) -> None:
    store.add_donor(donor("d1"))
    original = workload("w1")
    add_workloads(store, original)
    now = T0 + timedelta(seconds=10, microseconds=5)
    placed = WorkloadEvent("w1", now, "placed", donor_id="d1", epoch=1, detail="idle donor")
    lease = now + timedelta(seconds=30)
    updated = store.update_workload(
        "w1",
        expected_epoch=0,
        event=placed,
        state=WorkloadState.ASSIGNED,
        donor_id="d1",
        epoch=1,
        lease_until=lease,
        detail="starting",
        now=now,
    )
    expected = replace(
        original,
        state=WorkloadState.ASSIGNED,
        donor_id="d1",
        epoch=1,
        lease_until=lease,
        detail="starting",
        updated_at=now,
    )
    assert updated == expected
    assert store.get_workload("w1") == expected
    assert store.workload_events("w1") == [submitted(original), placed]

    # Only what is given changes; no event is fine too.
    later = now + timedelta(seconds=1)
    running = store.update_workload("w1", expected_epoch=1, state=WorkloadState.RUNNING, now=later)
    assert running == replace(expected, state=WorkloadState.RUNNING, updated_at=later)
    assert len(store.workload_events("w1")) == 2

    # Requeue: the donor goes, and with it the lease.
    requeued = store.update_workload(
        "w1", expected_epoch=1, state=WorkloadState.QUEUED, clear_donor=True, now=later
    )
    assert (requeued.donor_id, requeued.lease_until, requeued.epoch) == (None, None, 1)
    assert store.get_workload("w1") == requeued


def test_update_workload_conflict_changes_nothing(store: Store) -> None:
    store.add_donor(donor("d1"))
    original = workload("w1", state=WorkloadState.RUNNING, donor_id="d1", epoch=4, lease_until=T0)
    add_workloads(store, original)
    events_before = store.workload_events("w1")
    for stale in (3, 5, 0):
        with pytest.raises(Conflict):
            store.update_workload(
                "w1",
                expected_epoch=stale,
                event=WorkloadEvent("w1", T0, "moved", epoch=stale + 1),
                state=WorkloadState.QUEUED,
                clear_donor=True,
                epoch=stale + 1,
                detail="should not stick",
                now=T0 + timedelta(hours=1),
            )
    assert store.get_workload("w1") == original
    assert store.workload_events("w1") == events_before


def test_checkpoint_is_set_replaced_and_cleared(store: Store) -> None:
    store.add_donor(donor("d1"))
    store.add_donor(donor("d2"))
    held = workload("w1", state=WorkloadState.RUNNING, donor_id="d1", epoch=1, lease_until=T0)
    add_workloads(store, held, workload("w2"))
    assert store.get_workload("w1") == held  # no checkpoint yet
    assert held.checkpoint is None

    first = checkpoint_ref(epoch=1, donor_id="d1")
    now = T0 + timedelta(minutes=6)
    saved = WorkloadEvent("w1", now, "checkpointed", donor_id="d1", epoch=1)
    updated = store.update_workload(
        "w1",
        expected_epoch=1,
        event=saved,
        state=WorkloadState.CHECKPOINTED,
        checkpoint=first,
        now=now,
    )
    expected = replace(held, state=WorkloadState.CHECKPOINTED, checkpoint=first, updated_at=now)
    assert updated == expected
    # Every read gives it back.
    assert store.get_workload("w1") == expected
    assert store.list_workloads() == [expected, workload("w2")]
    assert store.list_workloads(donor_id="d1") == [expected]
    assert store.expired_leases(T0 + timedelta(seconds=1)) == [expected]
    assert store.workload_events("w1")[-1] == saved

    # Moving the workload leaves the checkpoint alone (it restarts from it).
    moved = store.update_workload("w1", expected_epoch=1, donor_id="d2", epoch=2, now=now)
    assert moved.checkpoint == first

    # A later checkpoint replaces it: only the latest is kept.
    second = checkpoint_ref(SHA_B, epoch=2, donor_id="d2", taken=timedelta(hours=1))
    replaced = store.update_workload("w1", expected_epoch=2, checkpoint=second, now=now)
    assert replaced.checkpoint == second
    assert store.get_workload("w1") == replaced

    cleared = store.update_workload("w1", expected_epoch=2, clear_checkpoint=True, now=now)
    assert cleared.checkpoint is None
    assert store.get_workload("w1") == replace(replaced, checkpoint=None)
    assert store.get_workload("w2") == workload("w2")  # the other workload untouched


def test_conflict_leaves_the_old_checkpoint(store: Store) -> None:
    store.add_donor(donor("d1"))
    add_workloads(store, workload("w1", state=WorkloadState.RUNNING, donor_id="d1", epoch=3))
    first = checkpoint_ref(epoch=3)
    before = store.update_workload("w1", expected_epoch=3, checkpoint=first, now=T0)
    events_before = store.workload_events("w1")
    for stale in (2, 4):
        with pytest.raises(Conflict):
            store.update_workload(
                "w1",
                expected_epoch=stale,
                event=WorkloadEvent("w1", T0, "checkpointed", epoch=stale),
                checkpoint=checkpoint_ref(SHA_B, epoch=stale),
                now=T0 + timedelta(hours=1),
            )
        with pytest.raises(Conflict):
            store.update_workload(
                "w1", expected_epoch=stale, clear_checkpoint=True, now=T0 + timedelta(hours=1)
            )
    assert store.get_workload("w1") == before
    assert before.checkpoint == first
    assert store.workload_events("w1") == events_before


def test_add_workload_keeps_its_checkpoint(store: Store) -> None:
    """A checkpoint names its donor without a foreign key: one never enrolled here (or
    removed since) does not block it."""
    record = replace(workload("w1"), checkpoint=checkpoint_ref(donor_id="gone-donor"))
    add_workloads(store, record)
    assert store.get_workload("w1") == record
    assert store.list_workloads() == [record]


def test_update_workload_refuses_bad_checkpoints(store: Store) -> None:
    add_workloads(store, workload("w1"))
    naive = replace(checkpoint_ref(), taken_at=datetime(2025, 1, 1, 12, 0))
    bad = [
        {"checkpoint": checkpoint_ref(), "clear_checkpoint": True},
        {"checkpoint": naive},
        {"checkpoint": checkpoint_ref("A" * 64)},
        {"checkpoint": checkpoint_ref("a" * 65)},
        {"checkpoint": checkpoint_ref(donor_id="x" * 65)},
        {"checkpoint": replace(checkpoint_ref(), size=-1)},
    ]
    for kwargs in bad:
        with pytest.raises(ValueError):
            store.update_workload("w1", expected_epoch=0, now=T0, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        store.add_workload(replace(workload("w2"), checkpoint=naive), submitted(workload("w2")))
    assert store.get_workload("w1") == workload("w1")
    assert store.get_workload("w2") is None


def test_update_unknown_workload_is_key_error(store: Store) -> None:
    with pytest.raises(KeyError):
        store.update_workload("nope", expected_epoch=0, state=WorkloadState.FAILED, now=T0)
    assert store.workload_events("nope") == []


def test_update_workload_refuses_inconsistent_arguments(store: Store) -> None:
    store.add_donor(donor("d1"))
    add_workloads(store, workload("w1"))
    with pytest.raises(ValueError):
        store.update_workload("w1", expected_epoch=0, donor_id="d1", clear_donor=True, now=T0)
    with pytest.raises(ValueError):
        store.update_workload("w1", expected_epoch=0, event=WorkloadEvent("w2", T0, "x"), now=T0)
    with pytest.raises(ValueError):
        store.update_workload("w1", expected_epoch=0, lease_until=T0, clear_donor=True, now=T0)
    with pytest.raises(ValueError):
        store.update_workload("w1", expected_epoch=0, state="lost", now=T0)  # type: ignore[arg-type]
    assert store.get_workload("w1") == workload("w1")
    assert store.workload_events("w1") == [submitted(workload("w1"))]


def test_concurrent_compare_and_set_has_one_winner(store: Store) -> None:
    store.add_donor(donor("d1"))
    add_workloads(store, workload("w1"))

    def bump() -> WorkloadRecord:
        return store.update_workload(
            "w1",
            expected_epoch=0,
            event=WorkloadEvent("w1", T0, "placed", donor_id="d1", epoch=1),
            state=WorkloadState.ASSIGNED,
            donor_id="d1",
            epoch=1,
            now=T0,
        )

    results = race(THREADS, bump)
    assert sum(isinstance(r, WorkloadRecord) for r in results) == 1, results
    assert sum(isinstance(r, Conflict) for r in results) == THREADS - 1, results
    assert [e.kind for e in store.workload_events("w1")] == ["submitted", "placed"]


def test_renew_leases_only_for_matching_donor_and_epoch(store: Store) -> None:
    store.add_donor(donor("d1"))
    store.add_donor(donor("d2"))
    add_workloads(
        store,
        workload("w1", state=WorkloadState.RUNNING, donor_id="d1", epoch=2, lease_until=T0),
        workload("w2", state=WorkloadState.PAUSED, donor_id="d2", epoch=1, lease_until=T0),
        workload("w3", state=WorkloadState.RUNNING, donor_id="d1", epoch=7, lease_until=T0),
        workload("w4", state=WorkloadState.QUEUED),
    )
    until = T0 + timedelta(seconds=30, microseconds=1)
    matched = store.renew_leases(
        [
            LeaseRenewal("w1", "d1", 2, until),  # matches
            LeaseRenewal("w2", "d2", 1, until),  # matches
            LeaseRenewal("w3", "d1", 6, until),  # stale epoch
            LeaseRenewal("w2", "d1", 1, until),  # wrong donor
            LeaseRenewal("w4", "d1", 0, until),  # not held
            LeaseRenewal("ghost", "d1", 1, until),  # unknown
        ]
    )
    assert matched == 2
    leases = {w.workload_id: w.lease_until for w in store.list_workloads()}
    assert leases == {"w1": until, "w2": until, "w3": T0, "w4": None}
    # The renewed times compare in SQL like times written any other way.
    assert [w.workload_id for w in store.expired_leases(until)] == ["w3"]
    after = until + timedelta(microseconds=1)
    assert [w.workload_id for w in store.expired_leases(after)] == ["w3", "w1", "w2"]
    assert store.renew_leases([]) == 0


def test_expired_leases(store: Store) -> None:
    store.add_donor(donor("d1"))
    now = T0 + timedelta(minutes=1)
    held = [
        (WorkloadState.ASSIGNED, now - timedelta(seconds=5)),
        (WorkloadState.RUNNING, now - timedelta(seconds=30)),
        (WorkloadState.PAUSED, now - timedelta(microseconds=1)),
        (WorkloadState.EVACUATING, now - timedelta(seconds=1)),
        (WorkloadState.CHECKPOINTED, now - timedelta(seconds=2)),
    ]
    expired = [
        workload(f"e-{state.value}", state=state, donor_id="d1", epoch=1, lease_until=lease)
        for state, lease in held
    ]
    alive = [
        workload("a-now", state=WorkloadState.RUNNING, donor_id="d1", epoch=1, lease_until=now),
        workload(
            "a-later",
            state=WorkloadState.RUNNING,
            donor_id="d1",
            epoch=1,
            lease_until=now + timedelta(seconds=1),
        ),
        workload("a-queued", lease_until=now - timedelta(hours=1)),
        workload("a-failed", state=WorkloadState.FAILED, lease_until=now - timedelta(hours=1)),
    ]
    add_workloads(store, *expired, *alive)
    got = store.expired_leases(now)
    assert got == sorted(expired, key=lambda w: w.lease_until or now)  # oldest lease first


def test_workload_events_oldest_first(store: Store) -> None:
    original = workload("w1")
    add_workloads(store, original, workload("w2"))
    late = WorkloadEvent("w1", T0 + timedelta(seconds=9), "late")
    early = WorkloadEvent("w1", T0 + timedelta(seconds=2), "early", detail="first after submit")
    same_a = WorkloadEvent("w1", T0 + timedelta(seconds=5), "same-a")
    same_b = WorkloadEvent("w1", T0 + timedelta(seconds=5), "same-b")
    for epoch, ev in enumerate((late, early, same_a, same_b)):
        store.update_workload("w1", expected_epoch=0, event=ev, detail=str(epoch), now=T0)
    assert store.workload_events("w1") == [submitted(original), early, same_a, same_b, late]
    assert [e.kind for e in store.workload_events("w2")] == ["submitted"]
    assert store.workload_events("nope") == []


# --- images ---------------------------------------------------------------------------


def test_images_are_idempotent(store: Store) -> None:
    image = ImageRecord(sha256=SHA_A, size=14 * 1024 * 1024 * 1024, added_at=T0)
    store.add_image(image)
    store.add_image(replace(image, size=1, added_at=T0 + timedelta(days=1)))
    assert store.get_image(SHA_A) == image
    assert store.get_image(SHA_B) is None


# --- idle history ---------------------------------------------------------------------


def test_idle_samples_add_up(store: Store) -> None:
    store.add_idle_samples(
        [
            IdleSample("d1", 10, seen_seconds=60.0, idle_seconds=30.0),
            IdleSample("d1", 10, seen_seconds=60.0, idle_seconds=60.0),  # same key, one batch
            IdleSample("d2", 10, seen_seconds=100.0, idle_seconds=0.0),
            IdleSample("d1", 11, seen_seconds=10.0, idle_seconds=10.0),
            IdleSample("d3", 10, seen_seconds=0.0, idle_seconds=0.0),
        ]
    )
    assert store.idle_ratios(["d1", "d2", "d3", "d4"], 10) == {"d1": 0.75, "d2": 0.0}
    store.add_idle_samples([IdleSample("d2", 10, seen_seconds=100.0, idle_seconds=100.0)])
    assert store.idle_ratios(["d1", "d2"], 10) == {"d1": 0.75, "d2": 0.5}
    assert store.idle_ratios(["d1"], 11) == {"d1": 1.0}
    assert store.idle_ratios(["d1", "d2"], 12) == {}
    assert store.idle_ratios([], 10) == {}
    store.add_idle_samples([])


def test_idle_samples_refuse_bad_hours(store: Store) -> None:
    store.add_idle_samples([IdleSample("d1", 167, 1.0, 1.0), IdleSample("d1", 0, 2.0, 1.0)])
    for bad in (IdleSample("d1", 168, 1.0, 1.0), IdleSample("d1", -1, 1.0, 1.0)):
        with pytest.raises(ValueError, match="hour_of_week"):
            store.add_idle_samples([IdleSample("d1", 0, 5.0, 5.0), bad])
    assert store.idle_ratios(["d1"], 0) == {"d1": 0.5}  # the refused batch left nothing


def test_idle_ratios_many_donors(store: Store) -> None:
    """More ids than one IN (...) takes (the store splits them)."""
    ids = [f"d{i:05d}" for i in range(5_500)]
    store.add_idle_samples([IdleSample(d, 42, 100.0, float(i % 101)) for i, d in enumerate(ids)])
    ratios = store.idle_ratios(ids, 42)
    assert len(ratios) == len(ids)
    assert ratios["d00000"] == 0.0
    assert ratios["d00100"] == 1.0
    assert ratios["d05499"] == (5499 % 101) / 100.0


# --- times ----------------------------------------------------------------------------


def test_aware_datetimes_round_trip_exactly(store: Store) -> None:
    plus_five_thirty = timezone(timedelta(hours=5, minutes=30))
    moments = [
        datetime(2025, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
        datetime(2025, 1, 1, 0, 0, 0, 1, tzinfo=plus_five_thirty),
        datetime(1999, 6, 15, 12, 0, tzinfo=UTC),
    ]
    for i, moment in enumerate(moments):
        store.add_image(ImageRecord(sha256=f"{i:064x}", size=i, added_at=moment))
        got = store.get_image(f"{i:064x}")
        assert got is not None
        assert got.added_at == moment  # the same instant...
        assert got.added_at.utcoffset() == timedelta(0)  # ...given back in UTC
        assert got.added_at.microsecond == moment.microsecond


def test_every_time_comes_back_in_utc(store: Store) -> None:
    """Times given in another zone come back as the same instants, in UTC, in every
    record the store returns."""
    zone = timezone(timedelta(hours=-7))

    def at(seconds: float) -> datetime:
        return (T0 + timedelta(seconds=seconds)).astimezone(zone)

    cap = replace(capacity(), lend_until=at(7))
    store.add_token(replace(token(), created_at=at(0), expires_at=at(3600)))
    used = store.use_token("tok1", SHA_A, at(1))
    store.add_donor(replace(donor("d1"), enrolled_at=at(0), capacity=cap, last_seen=at(2)))
    store.add_donor(replace(donor("d2"), enrolled_at=at(1)))
    store.record_seen([DonorSeen("d2", at(3), cap)])
    first = replace(
        workload("w1", state=WorkloadState.RUNNING, donor_id="d1", epoch=1),
        created_at=at(0),
        updated_at=at(1),
        lease_until=at(30),
        checkpoint=replace(checkpoint_ref(), taken_at=at(4)),
    )
    store.add_workload(first, WorkloadEvent("w1", at(0), "submitted"))
    moved = WorkloadEvent("w1", at(5), "moved", donor_id="d2", epoch=2)
    store.update_workload(
        "w1", expected_epoch=1, event=moved, donor_id="d2", epoch=2, lease_until=at(40), now=at(5)
    )
    second = workload("w2", state=WorkloadState.PAUSED, donor_id="d1", epoch=1, lease_until=T0)
    add_workloads(store, second)
    assert store.renew_leases([LeaseRenewal("w2", "d1", 1, at(50))]) == 1
    store.add_image(ImageRecord(sha256=SHA_A, size=1, added_at=at(6)))

    records: list[object] = [used, store.get_image(SHA_A)]
    records += store.list_donors()
    records += store.list_workloads()
    records += store.expired_leases(at(3600))
    records += store.workload_events("w1")
    times = list(times_in(records))
    assert len(times) == 25
    assert all(t.utcoffset() == timedelta(0) for t in times), times
    assert store.get_workload("w1") == replace(
        first, donor_id="d2", epoch=2, lease_until=at(40), updated_at=at(5)
    )
    assert store.get_workload("w2") == replace(second, lease_until=at(50))
    assert store.workload_events("w1") == [WorkloadEvent("w1", at(0), "submitted"), moved]


def times_in(values: list[object]) -> Iterator[datetime]:
    """Every datetime in the records, nested ones (capacity, checkpoint) included."""
    for value in values:
        if isinstance(value, datetime):
            yield value
        elif is_dataclass(value) and not isinstance(value, type):
            yield from times_in([getattr(value, f.name) for f in fields(value)])


def test_naive_datetimes_are_refused(store: Store) -> None:
    naive = datetime(2025, 1, 1, 12, 0)
    store.add_donor(donor("d1"))
    original = workload("w1", state=WorkloadState.RUNNING, donor_id="d1", epoch=1, lease_until=T0)
    add_workloads(store, original)
    late = replace(workload("w2"), lease_until=naive)
    refused: list[Callable[[], object]] = [
        lambda: store.add_image(ImageRecord(sha256=SHA_A, size=1, added_at=naive)),
        lambda: store.record_seen([DonorSeen("d1", naive, capacity())]),
        lambda: store.record_seen([DonorSeen("d1", T0, replace(capacity(), lend_until=naive))]),
        lambda: store.add_token(replace(token(), expires_at=naive)),
        lambda: store.use_token("tok1", SHA_A, naive),
        lambda: store.add_donor(donor("d2", last_seen=naive)),
        lambda: store.add_donor(donor("d3", capacity=replace(capacity(), lend_until=naive))),
        lambda: store.add_workload(late, submitted(workload("w2"))),
        lambda: store.update_workload("w1", expected_epoch=1, now=naive),
        lambda: store.update_workload("w1", expected_epoch=1, lease_until=naive, now=T0),
        lambda: store.update_workload(
            "w1", expected_epoch=1, event=WorkloadEvent("w1", naive, "x"), now=T0
        ),
        lambda: store.renew_leases([LeaseRenewal("w1", "d1", 1, naive)]),
        lambda: store.expired_leases(naive),
    ]
    for call in refused:
        with pytest.raises(ValueError, match="naive"):
            call()
    assert store.get_image(SHA_A) is None
    assert store.list_donors() == [donor("d1")]
    assert store.list_workloads() == [original]
    assert store.workload_events("w1") == [submitted(original)]
    with pytest.raises(TokenRefused, match="unknown"):
        store.use_token("tok1", SHA_A, T0)


# --- migrations and reopening ---------------------------------------------------------


def test_migrated_schema_matches_metadata(sql_store: SqlStore) -> None:
    """The revisions build exactly the tables schema.py describes (add a revision after
    changing schema.py: see migrate.py)."""
    with sql_store.engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        assert compare_metadata(context, metadata) == []


def test_upgrading_an_upgraded_database_is_a_no_op(sql_store: SqlStore, store_url: str) -> None:
    sql_store.add_token(token(uses=4))
    assert current_revision(store_url) == head_revision()
    upgrade(store_url)
    upgrade(sql_store.engine)
    assert current_revision(store_url) == head_revision()
    assert stored_uses_left(sql_store, "tok1") == 4
    with sql_store.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(tokens)).scalar_one() == 1


def downgrade(url: str, revision: str) -> None:
    """Take the database at `url` down to `revision` (the product only upgrades)."""
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            if engine.dialect.name == "sqlite":
                # As migrate.upgrade does: a table rebuild with foreign keys on would
                # fail. The pragma is a no-op inside a transaction, hence the driver.
                driver = conn.connection.driver_connection
                assert driver is not None
                driver.execute("PRAGMA foreign_keys=OFF")
            with conn.begin():
                config = alembic_config()
                config.attributes["connection"] = conn
                command.downgrade(config, revision)
    finally:
        engine.dispose()


def workload_columns(url: str) -> set[str]:
    engine = make_engine(url)
    try:
        return {c["name"] for c in inspect(engine).get_columns("workloads")}
    finally:
        engine.dispose()


def test_upgrade_to_r0002_keeps_workloads_without_checkpoint(store_url: str) -> None:
    upgrade(store_url, "r0001")
    assert current_revision(store_url) == "r0001"
    assert "checkpoint_sha256" not in workload_columns(store_url)
    held = workload("w1", state=WorkloadState.RUNNING, donor_id="d1", epoch=2, lease_until=T0)
    engine = make_engine(store_url)
    try:
        with engine.begin() as conn:
            # Written as an r0001 coordinator would: only the columns it knew.
            conn.execute(
                donors_table.insert().values(
                    donor_id="d1", hostname="d1.example.org", cert_sha256=SHA_B, enrolled_at=T0
                )
            )
            conn.execute(
                workloads.insert().values(
                    workload_id=held.workload_id,
                    spec=vmspec_to_json(held.spec),
                    priority=held.priority,
                    state=held.state.value,
                    created_at=held.created_at,
                    updated_at=held.updated_at,
                    donor_id=held.donor_id,
                    epoch=held.epoch,
                    lease_until=held.lease_until,
                    detail=held.detail,
                )
            )
    finally:
        engine.dispose()

    opened = open_store(store_url)  # upgrades to head
    try:
        assert current_revision(store_url) == head_revision()
        assert opened.get_workload("w1") == held
        assert opened.list_workloads() == [held]
        cp = checkpoint_ref(epoch=2)
        assert (
            opened.update_workload("w1", expected_epoch=2, checkpoint=cp, now=T0).checkpoint == cp
        )
    finally:
        opened.close()


def test_downgrade_from_r0002_drops_only_the_checkpoint(store_url: str) -> None:
    opened = open_store(store_url)
    try:
        opened.add_donor(donor("d1"))
        held = workload("w1", state=WorkloadState.RUNNING, donor_id="d1", epoch=2, lease_until=T0)
        add_workloads(opened, held)
        opened.update_workload("w1", expected_epoch=2, checkpoint=checkpoint_ref(), now=T0)
    finally:
        opened.close()

    downgrade(store_url, "r0001")
    assert current_revision(store_url) == "r0001"
    assert not any(c.startswith("checkpoint_") for c in workload_columns(store_url))

    again = open_store(store_url)
    try:
        assert again.get_workload("w1") == held  # the row stayed; its checkpoint went
        assert again.workload_events("w1") == [submitted(held)]
    finally:
        again.close()


def test_reopening_keeps_the_data(sql_store: SqlStore, store_url: str) -> None:
    sql_store.add_donor(donor("d1", capacity=capacity()))
    held = workload("w1", state=WorkloadState.RUNNING, donor_id="d1", epoch=2, lease_until=T0)
    add_workloads(sql_store, held)
    sql_store.add_token(token(uses=2))
    sql_store.add_idle_samples([IdleSample("d1", 5, 10.0, 4.0)])
    sql_store.close()

    again = open_store(store_url)
    try:
        assert again.get_donor("d1") == donor("d1", capacity=capacity())
        assert again.get_workload("w1") == held
        assert again.workload_events("w1") == [submitted(held)]
        assert again.use_token("tok1", SHA_A, T0).uses_left == 1
        assert again.idle_ratios(["d1"], 5) == {"d1": 0.4}
    finally:
        again.close()


def test_coordinators_starting_together_migrate_once(store_url: str) -> None:
    """Several coordinators opening one new database at once: all succeed."""
    results = race(4, lambda: upgrade(store_url))
    assert results == [None] * 4
    assert current_revision(store_url) == head_revision()
    opened = open_store(store_url)
    try:
        assert opened.list_donors() == []
    finally:
        opened.close()


def test_sqlite_connections_are_configured(tmp_path: Path) -> None:
    opened = open_store(f"sqlite:///{tmp_path / 'fleet.db'}")
    try:
        with opened.engine.connect() as conn:
            pragmas = {
                name: conn.exec_driver_sql(f"PRAGMA {name}").scalar()
                for name in ("journal_mode", "synchronous", "foreign_keys", "busy_timeout")
            }
    finally:
        opened.close()
    assert pragmas == {
        "journal_mode": "wal",
        "synchronous": 1,  # NORMAL
        "foreign_keys": 1,
        "busy_timeout": 10_000,
    }


# --- opening (not per database) -------------------------------------------------------


def test_open_store_refuses_unsupported_urls(tmp_path: Path) -> None:
    for url in ("sqlite://", "sqlite:///:memory:", "mysql://u@h/db", "postgresql+psycopg2://h/db"):
        with pytest.raises(ValueError):
            open_store(url)


def test_default_sqlite_url_creates_the_data_dir(tmp_path: Path) -> None:
    data_dir = tmp_path / "nested" / "data"
    url = default_sqlite_url(data_dir)
    opened = open_store(url)
    try:
        opened.add_image(ImageRecord(sha256=SHA_A, size=1, added_at=T0))
    finally:
        opened.close()
    assert (data_dir / "coordinator.db").is_file()
    assert (data_dir.stat().st_mode & 0o777) == 0o700
