"""Moves between donors, for real: a coordinator, two or three donors (each a private
libvirtd and a real donor-agent process), the tiny guest whose serial counter proves it
kept its state. See donor_app/coordinator/fleet/move.py for the protocol.

1. The owner returns on the guest's donor and stays: the guest continues on the other
   donor (live); the counter never goes backwards and the gap is measured.
2. The live migration's target dies mid-way: the guest is still on its donor, then
   moves cold (through a checkpoint) to the third donor.
3. The guest's donor dies (SIGKILL, its libvirt and guest with it): after the lease the
   guest runs on the other donor from its last periodic checkpoint; when the dead donor
   comes back it does not run the guest again.
4. The coordinator restarts in the middle of a live migration: nothing is lost or
   duplicated.
"""

from __future__ import annotations

import socket
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from datetime import UTC, timedelta
from pathlib import Path

import pytest

from donor_app.coordinator.admin_rpc import AdminRpc as AdminClient
from donor_app.coordinator.fleet import FleetConfig
from donor_app.domain.link import MigrationLimits
from donor_app.domain.records import WorkloadEvent
from donor_app.proto.v1 import coordinator_pb2 as pb
from tests.coordinator_helpers import RunningCoordinator, running_coordinator
from tests.e2e.donor_pair import (
    Donor,
    OwnerAtDesk,
    idle_donors,
    kill_donor,
    running_donor,
    start_agent,
    tiny_workload,
    wait_running,
    workload,
)
from tests.guests import shared_tmp_dir
from tests.ticks import TickWatcher, check_continuity
from tests.waiting import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.qemu]

LEASE = timedelta(seconds=10)


def fleet_config(**changes: object) -> FleetConfig:
    base: dict[str, object] = {
        "lease_ttl": LEASE,
        "report_interval": timedelta(seconds=1),
        "migration": MigrationLimits(max_downtime_ms=100, deadline_s=60),
        "cold_move_deadline": timedelta(seconds=120),
        "checkpoint_interval": None,
    }
    base.update(changes)
    return FleetConfig(**base)


@pytest.fixture
def base() -> Iterator[Path]:
    # Short: libvirt's and the agent's Unix sockets live under it (108-byte limit).
    with tempfile.TemporaryDirectory(prefix="mg-", dir="/tmp") as name:
        yield shared_tmp_dir(Path(name))  # QEMU (libvirt-qemu) reads the guests' files


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _events(coordinator: RunningCoordinator, workload_id: str) -> list[WorkloadEvent]:
    fleet = coordinator.server.fleet
    assert fleet is not None
    return fleet.store.workload_events(workload_id)


def _kinds(coordinator: RunningCoordinator, workload_id: str) -> list[tuple[str, str]]:
    return [(e.kind, e.detail) for e in _events(coordinator, workload_id)]


@contextmanager
def _fleet(
    coordinator: RunningCoordinator, base: Path, names: tuple[str, ...]
) -> Iterator[tuple[list[Donor], AdminClient]]:
    with ExitStack() as stack:
        admin = stack.enter_context(coordinator.admin())
        donors = [
            stack.enter_context(running_donor(coordinator, admin, name, base / name))
            for name in names
        ]
        idle_donors(admin, len(names))
        yield donors, admin


@contextmanager
def _logs_on_failure(donors: list[Donor]) -> Iterator[None]:
    try:
        yield
    except AssertionError:
        for donor in donors:
            print(f"===== donor {donor.name} agent log (tail)\n{donor.agent.log_text()[-6000:]}")
            print(f"===== donor {donor.name} libvirt log (tail)\n{donor.daemon.log_text()[-3000:]}")
            states = {w: donor.domain_state(w) for w in _workload_ids(donor)}
            print(f"===== donor {donor.name} domains: {states}")
            for wid in _workload_ids(donor):
                with suppress(OSError):
                    tail = donor.console(wid).read_bytes()[-3000:].decode(errors="replace")
                    print(f"===== donor {donor.name} console of {wid} (tail)\n{tail}")
        raise


def _workload_ids(donor: Donor) -> list[str]:
    guests = donor.root / "data" / "guests-state" / "guests"
    return [p.name for p in guests.iterdir()] if guests.exists() else []


def _placed(donors: list[Donor], record: pb.Workload) -> tuple[Donor, list[Donor]]:
    source = next(d for d in donors if d.donor_id == record.donor_id)
    return source, [d for d in donors if d is not source]


def _ticks_on(watcher: TickWatcher, donor: Donor, more_than: int, timeout: float = 60) -> None:
    wait_for(
        lambda: len([t for t in watcher.ticks() if t.where == donor.name]) > more_than,
        timeout,
        f"the guest's counter on donor {donor.name}",
    )


def test_the_owner_returns_and_the_guest_continues_live_elsewhere(base: Path) -> None:
    with (
        running_coordinator(base / "coordinator", fleet=fleet_config()) as coordinator,
        _fleet(coordinator, base, ("a", "b")) as (donors, admin),
    ):
        submitted = tiny_workload(admin)
        wid = submitted.id
        source, [target] = _placed(donors, wait_running(admin, wid))
        cpu = source.qemu_cpu(wid)
        assert cpu is not None
        consoles = {d.name: d.console(wid) for d in donors}
        with TickWatcher(consoles) as watcher:
            _ticks_on(watcher, source, 20)
            with OwnerAtDesk(source):
                moved = wait_running(admin, wid, 120, not_on=source.donor_id)
                assert target.qemu_cpu(wid) == cpu  # the same CPU on the donor it moved to
                _ticks_on(watcher, target, 20)
        ticks = watcher.ticks()
        check_continuity(ticks)
        last_on_source = [t for t in ticks if t.where == source.name][-1]
        first_on_target = next(t for t in ticks if t.where == target.name)
        assert first_on_target.value > last_on_source.value
        gap_ms = (first_on_target.at - last_on_source.at) * 1000
        print(f"guest-visible gap (owner's pause included): {gap_ms:.0f} ms")
        assert moved.donor_id == target.donor_id
        assert moved.epoch > submitted.epoch
        kinds = [k for k, _ in _kinds(coordinator, wid)]
        assert "migrate" in kinds and "moved" in kinds, kinds
        assert "moved-cold" not in kinds
        moved_detail = next(d for k, d in _kinds(coordinator, wid) if k == "moved")
        assert "live from donor" in moved_detail
        assert source.domain_state(wid) is None  # gone from the source, not even defined
        assert target.domain_state(wid) == "running"
        # What each owner's tray shows (the agents' status): where the guest went/came from.
        # The coordinator may know first (the target reports the guest running before the
        # source's libvirt call returns), so each agent is given a moment.
        for donor, expected in (
            (source, ("left", wid, target.donor_id)),
            (target, ("arrived", wid, source.donor_id)),
        ):
            wait_for(
                lambda d=donor, e=expected: (
                    e in [(m.event, m.guest, m.peer) for m in d.agent.client.status().moves]
                ),
                30,
                f"{expected[0]!r} in {donor.name}'s status",
            )
        for donor in donors:
            assert "Traceback" not in donor.agent.log_text()


def test_a_failed_live_migration_leaves_the_guest_and_it_moves_cold(base: Path) -> None:
    # A slow stream so the target can die while the guest is on its way.
    config = fleet_config(migration=MigrationLimits(bandwidth_mibps=2, deadline_s=120))
    with (
        running_coordinator(base / "coordinator", fleet=config) as coordinator,
        _fleet(coordinator, base, ("a", "b", "c")) as (donors, admin),
    ):
        wid = tiny_workload(admin).id
        source, others = _placed(donors, wait_running(admin, wid))
        with TickWatcher({d.name: d.console(wid) for d in donors}) as watcher:
            _ticks_on(watcher, source, 20)
            with OwnerAtDesk(source):
                # The guest is arriving somewhere: that donor dies.
                target = wait_for(
                    lambda: next((d for d in others if d.domain_state(wid) is not None), None),
                    120,
                    "a live migration to begin",
                    interval=0.05,
                )
                kill_donor(target)
                wait_for(
                    lambda: any(k == "migrate-failed" for k, _ in _kinds(coordinator, wid)),
                    90,
                    "the coordinator to learn the migration failed",
                    interval=0.1,
                )
                # Still on its donor, paused or running (the owner is there: paused).
                assert source.domain_state(wid) in ("running", "paused")
                [third] = [d for d in others if d is not target]
                moved = wait_running(admin, wid, 180, not_on=source.donor_id)
                assert moved.donor_id == third.donor_id
                _ticks_on(watcher, third, 20)
        ticks = watcher.ticks()
        check_continuity(ticks)
        assert not [t for t in ticks if t.where == target.name]
        kinds = [k for k, _ in _kinds(coordinator, wid)]
        assert "checkpoint" in kinds and "requeued" in kinds, kinds
        assert moved.HasField("checkpoint")
        assert source.domain_state(wid) is None  # its saved copy was fenced away
        assert "restored from the checkpoint" in third.agent.log_text()


def test_a_dead_donors_guest_restarts_from_its_checkpoint_and_never_runs_twice(
    base: Path,
) -> None:
    config = fleet_config(checkpoint_interval=timedelta(seconds=5))
    with (
        running_coordinator(base / "coordinator", fleet=config) as coordinator,
        _fleet(coordinator, base, ("a", "b")) as (donors, admin),
    ):
        wid = tiny_workload(admin).id
        placed = wait_running(admin, wid)
        source, [target] = _placed(donors, placed)
        with TickWatcher({d.name: d.console(wid) for d in donors}) as watcher:
            checkpointed = wait_for(
                lambda: (
                    (w := workload(admin, wid)).HasField("checkpoint")
                    and w.checkpoint.epoch == placed.epoch
                    and w
                ),
                90,
                "a periodic checkpoint",
                interval=0.2,
            )
            _ticks_on(watcher, source, 20)
            killed_at = time.monotonic()
            kill_donor(source)
            last_on_source = [t for t in watcher.ticks() if t.where == source.name][-1]
            moved = wait_running(admin, wid, LEASE.total_seconds() + 90, not_on=source.donor_id)
            failover_s = time.monotonic() - killed_at
            print(f"failover after SIGKILL: {failover_s:.1f} s (lease {LEASE.total_seconds()} s)")
            assert moved.donor_id == target.donor_id
            _ticks_on(watcher, target, 20)
            on_target = [t for t in watcher.ticks() if t.where == target.name]
            # Restored, not rebooted: a fresh boot would count from 1.
            assert on_target[0].value > 1
            assert on_target[0].value <= last_on_source.value + 1
            assert [t.value for t in on_target] == sorted(t.value for t in on_target)
            # Restored from the last checkpoint the dead donor uploaded, and only from that
            # one: the target's agent names it by when and where it was taken.
            last_upload = [
                e
                for e in _events(coordinator, wid)
                if e.kind == "checkpoint" and e.donor_id == source.donor_id
            ][-1]
            assert last_upload.epoch == placed.epoch
            assert last_upload.at >= checkpointed.checkpoint.taken_at.ToDatetime(tzinfo=UTC)
            taken_at = last_upload.at.astimezone(UTC).isoformat(timespec="seconds")
            restores = [
                line
                for line in target.agent.log_text().splitlines()
                if "restored from the checkpoint" in line
            ]
            assert len(restores) == 1, restores
            assert restores[0].endswith(
                f"restored from the checkpoint taken at {taken_at} on donor {source.donor_id}"
            ), (restores, taken_at)

            # The dead donor comes back (same machine, same enrollment).
            source.daemon.start()
            with start_agent(
                coordinator, admin, source.name, base / source.name, source.daemon
            ) as back:
                deadline = time.monotonic() + 15
                while time.monotonic() < deadline:
                    assert back.domain_state(wid) != "running"
                    time.sleep(0.2)
                wait_for(lambda: back.domain_state(wid) is None, 30, "its stale copy removed")
                assert workload(admin, wid).donor_id == target.donor_id
        assert not [t for t in watcher.ticks() if t.where == source.name and t.at > killed_at + 1]


def test_a_coordinator_restart_mid_migration_loses_and_duplicates_nothing(base: Path) -> None:
    ports = (_free_port(), _free_port())
    config = fleet_config(
        lease_ttl=timedelta(seconds=20),
        migration=MigrationLimits(bandwidth_mibps=8, deadline_s=120),
    )

    def coordinator_at():  # type: ignore[no-untyped-def]
        return running_coordinator(
            base / "coordinator",
            fleet=config,
            listen=f"127.0.0.1:{ports[0]}",
            enroll_listen=f"127.0.0.1:{ports[1]}",
        )

    first_cm = coordinator_at()
    first = first_cm.__enter__()
    try:
        with ExitStack() as stack:
            admin = stack.enter_context(first.admin())
            donors = [
                stack.enter_context(running_donor(first, admin, name, base / name))
                for name in ("a", "b")
            ]
            idle_donors(admin, 2)
            wid = tiny_workload(admin).id
            source, [target] = _placed(donors, wait_running(admin, wid))
            cpu = source.qemu_cpu(wid)
            assert cpu is not None
            watcher = stack.enter_context(TickWatcher({d.name: d.console(wid) for d in donors}))
            _ticks_on(watcher, source, 20)
            admin.move(wid)
            wait_for(
                lambda: target.domain_state(wid) is not None,
                60,
                "the guest arriving",
                interval=0.05,
            )
            # Mid-migration: the coordinator goes away, and comes back on the same ports
            # and data while the donors carry on.
            first_cm.__exit__(None, None, None)
            first_cm = None
            with (
                coordinator_at() as restarted,
                restarted.admin() as admin2,
                _logs_on_failure(donors),
            ):
                moved = wait_running(admin2, wid, 120, not_on=source.donor_id)
                assert moved.donor_id == target.donor_id
                assert target.qemu_cpu(wid) == cpu  # the same CPU on the donor it moved to
                _ticks_on(watcher, target, 20)
                assert source.domain_state(wid) is None
                assert target.domain_state(wid) == "running"
                assert len([w for w in admin2.workloads() if w.spec.name == "tiny"]) == 1
                kinds = [k for k, _ in _kinds(restarted, wid)]
                assert "moved" in kinds, kinds
            check_continuity(watcher.ticks())
    finally:
        if first_cm is not None:
            first_cm.__exit__(None, None, None)
