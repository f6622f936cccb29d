"""The agent's donation history (donor_app.agent.history) on real SQLite files."""

from __future__ import annotations

import logging
import math
import os
import sqlite3
import stat
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from donor_app.agent.history import MAX_BUCKETS, History
from donor_app.agent.history_file import SCHEMA_VERSION, HistoryError
from donor_app.domain.history import HourBucket, Totals, hour_window

REPO = Path(__file__).resolve().parents[3]
T0 = datetime(2024, 5, 1, 10, 0, tzinfo=UTC)
HOUR = timedelta(hours=1)
posix_only = pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")


class FakeClock:
    """A settable UTC clock, safe to read from several threads."""

    def __init__(self, now: datetime = T0) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, delta: timedelta) -> None:
        self.now += delta


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "data" / "history.sqlite3"


@pytest.fixture
def history(db_path: Path, clock: FakeClock) -> Iterator[History]:
    h = History.open(db_path, clock=clock)
    yield h
    h.close()


def committed_rows(path: Path) -> list[tuple[int, str, float, float]]:
    """What another process would see: only committed data."""
    with sqlite3.connect(path) as conn:
        rows: list[tuple[int, str, float, float]] = conn.execute(
            "SELECT hour, guest, cpu_seconds, memory_gib_hours FROM donation ORDER BY hour, guest"
        ).fetchall()
    conn.close()
    return rows


def aside_files(path: Path, kind: str = "corrupt") -> list[Path]:
    """The moved-aside database files (without their -wal/-shm)."""
    found = path.parent.glob(f"{path.name}.{kind}-*")
    return sorted(p for p in found if not p.name.endswith(("-wal", "-shm")))


# --- bucketing ----------------------------------------------------------------------


def test_records_in_one_hour_add_up(history: History) -> None:
    history.record(T0 + timedelta(minutes=1), "vm-a", 2.5, 0.25)
    history.record(T0 + timedelta(minutes=59, seconds=59), "vm-a", 1.5, 0.5)

    assert history.buckets(T0, T0 + HOUR) == [HourBucket(T0, 4.0, 0.75)]


def test_records_either_side_of_an_hour_boundary_go_to_their_own_hours(
    history: History,
) -> None:
    boundary = T0 + HOUR
    history.record(boundary - timedelta(microseconds=1), "vm-a", 3.0, 1.0)
    history.record(boundary, "vm-a", 5.0, 2.0)

    assert history.buckets(T0, T0 + 2 * HOUR) == [
        HourBucket(T0, 3.0, 1.0),
        HourBucket(boundary, 5.0, 2.0),
    ]


def test_a_time_in_another_zone_lands_in_its_utc_hour(history: History) -> None:
    berlin_summer = timezone(timedelta(hours=2))
    # 12:30 at +02:00 is 10:30 UTC.
    history.record(datetime(2024, 5, 1, 12, 30, tzinfo=berlin_summer), "vm-a", 1.0, 0.0)

    (bucket,) = history.buckets(T0, T0 + HOUR)
    assert bucket.start == T0
    assert bucket.start.utcoffset() == timedelta(0)
    assert bucket.cpu_seconds == 1.0


def test_buckets_are_summed_over_guests(history: History) -> None:
    history.record(T0, "vm-a", 1.0, 0.5)
    history.record(T0, "vm-b", 2.0, 0.25)

    assert history.buckets(T0, T0 + HOUR) == [HourBucket(T0, 3.0, 0.75)]


def test_hours_without_donation_are_returned_with_zeros(history: History) -> None:
    history.record(T0 + timedelta(minutes=5), "vm-a", 1.0, 1.0)
    history.record(T0 + 3 * HOUR, "vm-a", 2.0, 2.0)

    assert history.buckets(T0, T0 + 4 * HOUR) == [
        HourBucket(T0, 1.0, 1.0),
        HourBucket(T0 + HOUR, 0.0, 0.0),
        HourBucket(T0 + 2 * HOUR, 0.0, 0.0),
        HourBucket(T0 + 3 * HOUR, 2.0, 2.0),
    ]


def test_an_empty_history_gives_a_zero_for_every_hour(history: History) -> None:
    buckets = history.buckets(T0, T0 + 24 * HOUR)

    assert [b.start for b in buckets] == [T0 + i * HOUR for i in range(24)]
    assert all(b.cpu_seconds == 0 and b.memory_gib_hours == 0 for b in buckets)


def test_buckets_cover_every_hour_overlapping_the_span(history: History) -> None:
    # Partial hours at both ends count; an end exactly on an hour excludes that hour.
    got = history.buckets(T0 + timedelta(minutes=30), T0 + 2 * HOUR + timedelta(seconds=1))
    assert [b.start for b in got] == [T0, T0 + HOUR, T0 + 2 * HOUR]
    assert [b.start for b in history.buckets(T0, T0 + 2 * HOUR)] == [T0, T0 + HOUR]
    assert history.buckets(T0 + timedelta(minutes=7), T0 + timedelta(minutes=7)) == []


def test_bad_spans_are_refused(history: History) -> None:
    with pytest.raises(ValueError, match="end"):
        history.buckets(T0 + HOUR, T0)
    with pytest.raises(ValueError, match="end"):
        history.buckets(T0, T0 + (MAX_BUCKETS + 1) * HOUR)
    with pytest.raises(ValueError, match="start"):
        history.totals(T0.replace(tzinfo=None), T0 + HOUR)
    assert len(history.buckets(T0, T0 + MAX_BUCKETS * HOUR)) == MAX_BUCKETS


# --- totals -------------------------------------------------------------------------


def test_totals_are_cpu_hours_and_gib_hours(history: History) -> None:
    history.record(T0, "vm-a", 1800.0, 1.5)
    history.record(T0 + HOUR, "vm-b", 5400.0, 2.5)

    assert history.totals(T0, T0 + 2 * HOUR) == Totals(cpu_hours=2.0, gib_hours=4.0)
    assert history.totals(T0 + HOUR, T0 + 2 * HOUR) == Totals(cpu_hours=1.5, gib_hours=2.5)
    assert history.totals(T0 + 5 * HOUR, T0 + 6 * HOUR) == Totals(0.0, 0.0)


def test_last_hour_day_and_week(history: History) -> None:
    now = datetime(2024, 5, 8, 10, 30, tzinfo=UTC)
    # last_day is the 24 hours 2024-05-07 11:00 .. 2024-05-08 11:00 (current one included);
    # last_week the 168 hours from 2024-05-01 11:00.
    history.record(now, "vm-a", 3600.0, 1.0)  # this hour
    history.record(now - timedelta(hours=23), "vm-a", 7200.0, 2.0)  # 05-07 11:30: day
    history.record(now - timedelta(hours=24), "vm-a", 10800.0, 4.0)  # 05-07 10:30: week
    history.record(datetime(2024, 5, 1, 11, 0, tzinfo=UTC), "vm-a", 3600.0, 8.0)  # week
    history.record(datetime(2024, 5, 1, 10, 59, tzinfo=UTC), "vm-a", 3600.0, 16.0)  # older

    assert history.last_hour(now) == Totals(cpu_hours=1.0, gib_hours=1.0)
    assert history.last_day(now) == Totals(cpu_hours=3.0, gib_hours=3.0)
    assert history.last_week(now) == Totals(cpu_hours=7.0, gib_hours=15.0)
    assert history.last_hours(now, 24 * 8) == Totals(cpu_hours=8.0, gib_hours=31.0)


def test_hour_window_ends_with_the_current_hour() -> None:
    now = datetime(2024, 5, 8, 10, 30, tzinfo=UTC)

    assert hour_window(now, 1) == (now.replace(minute=0), now.replace(hour=11, minute=0))
    start, end = hour_window(now, 24)
    assert (start, end) == (
        datetime(2024, 5, 7, 11, tzinfo=UTC),
        datetime(2024, 5, 8, 11, tzinfo=UTC),
    )
    with pytest.raises(ValueError, match="hours"):
        hour_window(now, 0)
    with pytest.raises(ValueError, match="now"):
        hour_window(now.replace(tzinfo=None), 1)


# --- validation ---------------------------------------------------------------------


@pytest.mark.parametrize("field", ["cpu_seconds", "memory_gib_hours"])
@pytest.mark.parametrize("bad", [-1.0, -1e-9, math.nan, math.inf, -math.inf])
def test_bad_deltas_are_refused_naming_the_field(history: History, field: str, bad: float) -> None:
    deltas = {"cpu_seconds": 1.0, "memory_gib_hours": 1.0, field: bad}
    with pytest.raises(ValueError, match=field):
        history.record(T0, "vm-a", **deltas)

    assert history.totals(T0, T0 + HOUR) == Totals(0.0, 0.0)


def test_naive_time_and_bad_guest_names_are_refused(history: History) -> None:
    with pytest.raises(ValueError, match="now"):
        history.record(T0.replace(tzinfo=None), "vm-a", 1.0, 1.0)
    with pytest.raises(ValueError, match="guest"):
        history.record(T0, "", 1.0, 1.0)
    with pytest.raises(ValueError, match="guest"):
        history.record(T0, "x" * 1000, 1.0, 1.0)


def test_zero_deltas_write_nothing(history: History, db_path: Path) -> None:
    history.record(T0, "vm-a", 0.0, 0.0)
    history.flush()

    assert committed_rows(db_path) == []


# --- persistence and commit batching -------------------------------------------------


def test_history_persists_across_close_and_open(db_path: Path, clock: FakeClock) -> None:
    with History.open(db_path, clock=clock) as first:
        first.record(T0, "vm-a", 60.0, 0.5)
    with History.open(db_path, clock=clock) as second:
        second.record(T0 + timedelta(minutes=1), "vm-a", 30.0, 0.25)
        assert second.buckets(T0, T0 + HOUR) == [HourBucket(T0, 90.0, 0.75)]
    with History.open(db_path, clock=clock) as third:
        assert third.totals(T0, T0 + HOUR) == Totals(cpu_hours=90 / 3600, gib_hours=0.75)


def test_commits_are_batched_by_the_interval(db_path: Path, clock: FakeClock) -> None:
    with History.open(db_path, clock=clock, commit_interval=timedelta(seconds=30)) as h:
        h.record(T0, "vm-a", 1.0, 0.0)
        clock.advance(timedelta(seconds=29))
        h.record(T0, "vm-a", 1.0, 0.0)
        # Not committed yet, but readers of this history already see it.
        assert committed_rows(db_path) == []
        assert h.buckets(T0, T0 + HOUR)[0].cpu_seconds == 2.0

        clock.advance(timedelta(seconds=1))
        h.record(T0, "vm-a", 1.0, 0.0)
        assert committed_rows(db_path) == [(int(T0.timestamp()), "vm-a", 3.0, 0.0)]

        h.record(T0, "vm-a", 1.0, 0.0)
        h.flush()
        assert committed_rows(db_path) == [(int(T0.timestamp()), "vm-a", 4.0, 0.0)]


def test_a_clock_jumping_back_commits_rather_than_waiting(db_path: Path, clock: FakeClock) -> None:
    with History.open(db_path, clock=clock) as h:
        clock.advance(-timedelta(hours=1))
        h.record(T0, "vm-a", 1.0, 0.0)
        assert committed_rows(db_path) == [(int(T0.timestamp()), "vm-a", 1.0, 0.0)]


def test_a_crash_loses_only_what_was_not_committed(db_path: Path) -> None:
    # A real crash: the process dies without close(); the next open sees the last commit.
    script = textwrap.dedent(
        f"""
        import os
        from datetime import datetime, timedelta, UTC
        from pathlib import Path
        from donor_app.agent.history import History

        t0 = datetime.fromisoformat({T0.isoformat()!r})
        h = History.open(Path({str(db_path)!r}), clock=lambda: t0,
                         commit_interval=timedelta(hours=1))
        h.record(t0, "vm-a", 10.0, 1.0)
        h.flush()
        h.record(t0, "vm-a", 5.0, 1.0)  # within the interval: not committed
        os._exit(3)
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", script], env=env, timeout=60, check=False)
    assert done.returncode == 3

    with History.open(db_path) as h:
        assert h.buckets(T0, T0 + HOUR) == [HourBucket(T0, 10.0, 1.0)]


def test_a_new_file_has_the_current_schema_in_wal_mode(history: History, db_path: Path) -> None:
    with sqlite3.connect(db_path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()


def test_an_old_schema_is_migrated(db_path: Path, clock: FakeClock) -> None:
    db_path.parent.mkdir(parents=True)
    sqlite3.connect(db_path).close()  # a valid, empty database at user_version 0

    with History.open(db_path, clock=clock) as h:
        h.record(T0, "vm-a", 1.0, 1.0)
        assert h.totals(T0, T0 + HOUR).gib_hours == 1.0
    assert aside_files(db_path) == []


def test_closed_history(db_path: Path, clock: FakeClock) -> None:
    h = History.open(db_path, clock=clock)
    h.close()
    h.close()  # idempotent

    h.record(T0, "vm-a", 1.0, 1.0)  # ignored: shutdown order must not matter
    h.flush()
    with pytest.raises(HistoryError, match="closed"):
        h.totals(T0, T0 + HOUR)


def test_in_memory_history(clock: FakeClock) -> None:
    with History.in_memory(clock=clock) as h:
        h.record(T0, "vm-a", 7200.0, 3.0)
        assert h.path is None
        assert h.last_hour(T0) == Totals(cpu_hours=2.0, gib_hours=3.0)


# --- corrupt files ------------------------------------------------------------------


def make_real_database(path: Path, hours: int = 3000) -> None:
    """A history with enough rows to span many pages, closed cleanly."""
    with History.open(path, clock=FakeClock()) as h:
        for i in range(hours):
            h.record(T0 + i * HOUR, f"guest-{i % 3}", 1.0, 1.0)


def assert_recovered(
    path: Path, original: bytes, caplog: pytest.LogCaptureFixture, kind: str = "corrupt"
) -> None:
    (moved,) = aside_files(path, kind)
    assert moved.name == f"{path.name}.{kind}-20240501T100000Z"
    assert moved.read_bytes() == original  # kept, byte for byte, for the owner
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert str(path) in warnings[0].getMessage()
    assert str(moved) in warnings[0].getMessage()


def test_a_file_of_random_bytes_is_moved_aside(
    db_path: Path, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    db_path.parent.mkdir(parents=True)
    garbage = os.urandom(64 * 1024)
    db_path.write_bytes(garbage)

    with caplog.at_level(logging.WARNING), History.open(db_path, clock=clock) as h:
        h.record(T0, "vm-a", 1.0, 1.0)
        assert h.totals(T0, T0 + HOUR).gib_hours == 1.0

    assert_recovered(db_path, garbage, caplog)


def test_a_truncated_database_is_moved_aside(
    db_path: Path, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    make_real_database(db_path)
    whole = db_path.read_bytes()
    assert len(whole) > 8 * 4096
    truncated = whole[: len(whole) // 2]
    db_path.write_bytes(truncated)

    with caplog.at_level(logging.WARNING), History.open(db_path, clock=clock) as h:
        assert h.totals(T0, T0 + 3000 * HOUR) == Totals(0.0, 0.0)  # a fresh history

    assert_recovered(db_path, truncated, caplog)


def test_a_database_failing_quick_check_is_moved_aside(
    db_path: Path, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    # A valid header over damaged pages: SQLite opens it, quick_check finds the damage.
    make_real_database(db_path)
    damaged = bytearray(db_path.read_bytes())
    damaged[4096:] = os.urandom(len(damaged) - 4096)
    db_path.write_bytes(bytes(damaged))

    with caplog.at_level(logging.WARNING), History.open(db_path, clock=clock) as h:
        assert h.buckets(T0, T0 + HOUR) == [HourBucket(T0, 0.0, 0.0)]

    assert_recovered(db_path, bytes(damaged), caplog)


def test_a_stale_wal_goes_aside_with_its_database(db_path: Path, clock: FakeClock) -> None:
    db_path.parent.mkdir(parents=True)
    db_path.write_bytes(os.urandom(4096))
    wal = Path(f"{db_path}-wal")
    wal.write_bytes(b"stale")

    with History.open(db_path, clock=clock) as h:
        h.record(T0, "vm-a", 1.0, 1.0)

    (moved,) = aside_files(db_path)
    assert Path(f"{moved}-wal").read_bytes() == b"stale"


def test_repeated_corruption_at_the_same_second_keeps_every_copy(
    db_path: Path, clock: FakeClock
) -> None:
    db_path.parent.mkdir(parents=True)
    for n in range(3):
        db_path.write_bytes(f"garbage {n}".encode() * 100)
        History.open(db_path, clock=clock).close()

    kept = {p.read_bytes()[:9] for p in aside_files(db_path)}
    assert kept == {b"garbage 0", b"garbage 1", b"garbage 2"}


def test_a_newer_schema_is_moved_aside(
    db_path: Path, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    make_real_database(db_path, hours=10)
    with sqlite3.connect(db_path) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    newer = db_path.read_bytes()

    with caplog.at_level(logging.WARNING), History.open(db_path, clock=clock) as h:
        assert h.totals(T0, T0 + 10 * HOUR) == Totals(0.0, 0.0)

    assert_recovered(db_path, newer, caplog, kind="newer")


def damage_under(history: History, db_path: Path) -> None:
    """Fill a history, then damage its pages on disk while it stays open."""
    for i in range(3000):
        history.record(T0 + i * HOUR, "vm-a", 1.0, 1.0)
    history.flush()
    # Another connection checkpoints (the data now lives only in the main file), the
    # pages are overwritten, and a commit from that connection makes the history drop
    # its page cache, so its next statement reads the damaged pages.
    other = sqlite3.connect(db_path, isolation_level=None)
    other.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    with db_path.open("r+b") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(4096)
        f.write(os.urandom(size - 4096))
    other.execute("PRAGMA user_version = 1")
    other.close()


def test_corruption_found_by_a_query_starts_a_fresh_history(
    history: History, db_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    damage_under(history, db_path)

    with caplog.at_level(logging.WARNING), pytest.raises(HistoryError, match="query failed"):
        history.totals(T0, T0 + 3000 * HOUR)

    assert len(aside_files(db_path)) == 1
    assert "became corrupt" in caplog.text
    history.record(T0, "vm-a", 2.0, 2.0)
    assert history.totals(T0, T0 + HOUR) == Totals(cpu_hours=2 / 3600, gib_hours=2.0)


def test_corruption_found_by_a_record_does_not_raise(
    history: History, db_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    damage_under(history, db_path)

    with caplog.at_level(logging.WARNING):
        history.record(T0 + 1500 * HOUR, "vm-a", 1.0, 1.0)  # dropped, not raised

    assert len(aside_files(db_path)) == 1
    assert "became corrupt" in caplog.text
    history.record(T0, "vm-a", 2.0, 2.0)
    assert history.totals(T0, T0 + 3000 * HOUR) == Totals(cpu_hours=2 / 3600, gib_hours=2.0)


def test_a_path_that_cannot_be_opened_raises_and_moves_nothing(
    tmp_path: Path, clock: FakeClock
) -> None:
    path = tmp_path / "history.sqlite3"
    path.mkdir()  # a directory where the file should be: not corruption

    with pytest.raises(HistoryError, match=str(path)):
        History.open(path, clock=clock)
    assert path.is_dir()
    assert aside_files(path) == []


# --- permissions --------------------------------------------------------------------


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@posix_only
def test_files_are_private_to_the_owner(history: History, db_path: Path) -> None:
    history.record(T0, "vm-a", 1.0, 1.0)
    history.flush()

    assert mode(db_path) == 0o600
    assert mode(Path(f"{db_path}-wal")) == 0o600
    assert mode(db_path.parent) == 0o700


@posix_only
def test_a_too_open_file_is_restricted(db_path: Path, clock: FakeClock) -> None:
    make_real_database(db_path, hours=1)
    db_path.chmod(0o644)

    with History.open(db_path, clock=clock) as h:
        assert h.totals(T0, T0 + HOUR).gib_hours == 1.0
    assert mode(db_path) == 0o600


@posix_only
def test_a_fresh_history_after_corruption_is_private(db_path: Path, clock: FakeClock) -> None:
    db_path.parent.mkdir(parents=True)
    db_path.write_bytes(os.urandom(4096))
    db_path.chmod(0o644)

    History.open(db_path, clock=clock).close()
    assert mode(db_path) == 0o600


# --- threads ------------------------------------------------------------------------


def test_one_writer_and_several_readers_at_once(db_path: Path) -> None:
    # The engine thread records while local-API threads query; the totals must come out
    # exact (0.5 and 0.25 add up without rounding) and never go backwards.
    records = 3000
    hours = 50
    wall = FakeClock()
    h = History.open(db_path, clock=wall, commit_interval=timedelta(seconds=1))
    done = threading.Event()
    errors: list[BaseException] = []
    start, end = T0, T0 + hours * HOUR

    def writer() -> None:
        try:
            for i in range(records):
                h.record(T0 + (i % hours) * HOUR, f"vm-{i % 4}", 0.5, 0.25)
                wall.advance(timedelta(milliseconds=100))  # a commit every 10 records
        except BaseException as exc:
            errors.append(exc)
        finally:
            done.set()

    def reader() -> None:
        last = Totals(0.0, 0.0)
        try:
            while not done.is_set():
                now = h.totals(start, end)
                assert now.gib_hours >= last.gib_hours
                assert now.cpu_hours >= last.cpu_hours
                buckets = h.buckets(start, end)
                assert len(buckets) == hours
                last = now
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer)] + [
        threading.Thread(target=reader) for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    assert errors == []

    expected = Totals(cpu_hours=records * 0.5 / 3600, gib_hours=records * 0.25)
    assert h.totals(start, end) == expected
    per_hour = records // hours
    assert all(b.memory_gib_hours == per_hour * 0.25 for b in h.buckets(start, end))
    h.close()
    with History.open(db_path) as reopened:
        assert reopened.totals(start, end) == expected
