"""The fleet's rules on a fake clock: leases, fencing, placement, moves, checkpoints and
the admin's commands, each in milliseconds (see fleet_harness.py)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from donor_app.coordinator.fleet import FleetConfig
from donor_app.coordinator.fleet.session import Code, Refused
from donor_app.domain import link
from donor_app.domain.decision import Level
from donor_app.domain.records import DonorRecord, WorkloadState
from tests.unit.coordinator.fleet_harness import CERT, LEASE, Donor, Harness, capacity, guest, run

RUNNING = link.GuestState.RUNNING
STOPPED = link.GuestState.STOPPED
FAILED = link.GuestState.FAILED


# --- placement -------------------------------------------------------------------------


def test_a_queued_workload_is_placed_on_a_donor_with_room_at_epoch_one(tmp_path: Path) -> None:
    async def body() -> None:
        h = Harness(tmp_path)
        a = await h.donor("a")
        record = await h.placed()
        assert (record.donor_id, record.epoch) == ("a", 1)
        assert record.lease_until == h.clock() + LEASE
        _, run_cmd = a.one(link.RunWorkload)
        assert (run_cmd.workload_id, run_cmd.epoch, run_cmd.spec) == (
            record.workload_id,
            1,
            record.spec,
        )

    run(body)


def test_nothing_is_placed_on_a_donor_without_room_or_handing_guests_back(
    tmp_path: Path,
) -> None:
    async def body() -> None:
        h = Harness(tmp_path)
        small = await h.donor("small", cap=capacity(memory_mib=200))
        await h.submit(memory_mib=256)
        assert await h.fleet.place_queued() == 0
        # A donor whose owner stayed (its level asks to move guests away) gets none.
        await small.report(level=Level.EVACUATE, cap=capacity())
        assert await h.fleet.place_queued() == 0
        await small.report(level=Level.RUN, cap=capacity())
        assert await h.fleet.place_queued() == 1

    run(body)


def test_a_drained_donor_gets_nothing_new(tmp_path: Path) -> None:
    async def body() -> None:
        h = Harness(tmp_path)
        await h.donor("a")
        await h.fleet.drain("a")
        await h.submit()
        assert await h.fleet.place_queued() == 0

    run(body)


def test_two_active_workloads_cannot_share_a_name_and_unknown_images_are_refused(
    tmp_path: Path,
) -> None:
    async def body() -> None:
        h = Harness(tmp_path)
        await h.submit("web")
        with pytest.raises(Refused) as same_name:
            await h.submit("web")
        assert same_name.value.code is Code.ALREADY_EXISTS
        spec = h.spec("other")
        missing = type(spec.boot)(
            kernel_sha256="f" * 64, initrd_sha256=h.boot.initrd_sha256, cmdline=""
        )
        with pytest.raises(Refused) as unknown:
            await h.fleet.submit(type(spec)("other", 1, 256, missing), 0)
        assert unknown.value.code is Code.FAILED_PRECONDITION
        assert "f" * 64 in unknown.value.message

    run(body)


# --- leases ------------------------------------------------------------------------------


def test_a_report_renews_the_lease_of_what_the_donor_holds_and_the_flush_keeps_it(
    tmp_path: Path,
) -> None:
    async def body() -> None:
        h = Harness(tmp_path)
        a = await h.donor("a")
        record = await h.placed()
        a.commands()
        h.clock.advance(20)
        await a.report(guest(record.workload_id, 1))
        _, ack = a.one(link.Ack)
        assert ack.lease_until == h.clock() + LEASE
        assert h.record(record.workload_id).lease_until == record.lease_until  # batched
        await h.fleet.flush()
        assert h.record(record.workload_id).lease_until == h.clock() + LEASE

    run(body)


def test_a_lease_that_ends_requeues_the_workload_and_it_is_placed_at_a_newer_epoch(
    tmp_path: Path,
) -> None:
    async def body() -> None:
        h = Harness(tmp_path)
        a = await h.donor("a")
        record = await h.placed()
        await a.report(guest(record.workload_id, 1))
        h.fleet.close_session(a.session)
        b = await h.donor("b")
        await h.tick(LEASE.total_seconds() - 1)
        assert h.record(record.workload_id).state is WorkloadState.RUNNING  # not yet
        await h.tick(2)
        requeued = h.record(record.workload_id)
        assert requeued.state is WorkloadState.QUEUED and requeued.donor_id is None
        assert "lease expired on donor a" in h.last_event(record.workload_id).detail
        assert await h.fleet.place_queued() == 1
        _, run_cmd = b.one(link.RunWorkload)
        assert run_cmd.epoch == 2 and h.record(record.workload_id).donor_id == "b"

    run(body)


def test_no_lease_expires_before_donors_had_one_ttl_to_come_back_after_a_restart(
    tmp_path: Path,
) -> None:
    async def body() -> None:
        h = Harness(tmp_path)
        a = await h.donor("a")
        record = await h.placed()
        await a.report(guest(record.workload_id, 1))
        h.clock.advance(LEASE.total_seconds() + 5)  # the lease ended while we were down
        await h.restart()
        await h.tick(LEASE.total_seconds() - 1)
        assert h.record(record.workload_id).state is WorkloadState.RUNNING
        await h.tick(2)
        assert h.record(record.workload_id).state is WorkloadState.QUEUED

    run(body)


def test_a_silent_donor_is_marked_lost_after_one_lease(tmp_path: Path) -> None:
    async def body() -> None:
        h = Harness(tmp_path)
        a = await h.donor("a")
        await h.fleet.flush()
        h.fleet.close_session(a.session)
        await h.tick(LEASE.total_seconds() - 1)
        donor = h.store.get_donor("a")
        assert donor is not None and not donor.lost
        await h.tick(2)
        donor = h.store.get_donor("a")
        assert donor is not None and donor.lost

    run(body)


# --- fencing -----------------------------------------------------------------------------


def test_a_donor_reporting_a_workload_never_assigned_to_it_is_refused(tmp_path: Path) -> None:
    async def body() -> None:
        h = Harness(tmp_path)
        await h.donor("a")
        record = await h.placed()
        b = await h.donor("b")
        await b.report(guest(record.workload_id, 1))
        assert b.session.closed and b.session.refusal is not None
        assert b.session.refusal.code is Code.PERMISSION_DENIED
        assert h.record(record.workload_id).donor_id == "a"

    run(body)


def test_a_stale_copy_is_told_to_stop_and_the_holder_keeps_the_workload(tmp_path: Path) -> None:
    async def body() -> None:
        h = Harness(tmp_path)
        a = await h.donor("a")
        record = await h.placed()
        h.fleet.close_session(a.session)
        b = await h.donor("b")
        await h.tick(LEASE.total_seconds() + 1)
        assert await h.fleet.place_queued() == 1
        await b.report(guest(record.workload_id, 2))
        a = await h.donor("a")  # back, still running its old copy
        a.commands()
        await a.report(guest(record.workload_id, 1))
        _, stop = a.one(link.StopWorkload)
        assert (stop.workload_id, stop.epoch) == (record.workload_id, 1)
        assert "stale epoch 1" in stop.reason and "on donor b" in stop.reason
        held = h.record(record.workload_id)
        assert (held.donor_id, held.epoch) == ("b", 2)
        assert not a.session.closed

    run(body)


def test_a_report_repeated_while_a_fence_is_pending_fences_once(tmp_path: Path) -> None:
    async def body() -> None:
        h = Harness(tmp_path)
        a = await h.donor("a")
        record = await h.placed()
        h.fleet.close_session(a.session)
        await h.donor("b")
        await h.tick(LEASE.total_seconds() + 1)
        await h.fleet.place_queued()
        a = await h.donor("a")
        a.commands()
        stale = link.Report(capacity(), (guest(record.workload_id, 1),))
        # Two reports before the first fence ran: one StopWorkload.
        await h.fleet.on_event(a.session, link.DonorEvent(10, stale))
        await h.fleet.on_event(a.session, link.DonorEvent(11, stale))
        await h.fleet.settle()
        assert len(a.sent(link.StopWorkload)) == 1

    run(body)


def test_the_last_donor_of_a_requeued_workload_keeps_it_if_back_before_it_moved(
    tmp_path: Path,
) -> None:
    async def body() -> None:
        h = Harness(tmp_path)
        a = await h.donor("a")
        record = await h.placed()
        await a.report(guest(record.workload_id, 1))
        h.fleet.close_session(a.session)
        await h.tick(LEASE.total_seconds() + 1)
        assert h.record(record.workload_id).state is WorkloadState.QUEUED
        a = await h.donor("a", guest(record.workload_id, 1))  # no other donor meanwhile
        kept = h.record(record.workload_id)
        assert (kept.state, kept.donor_id, kept.epoch) == (WorkloadState.RUNNING, "a", 1)
        assert h.events(record.workload_id)[-1] == "readopted"
        assert not a.sent(link.StopWorkload)

    run(body)


def test_a_stopped_copy_it_does_not_hold_is_told_once_to_forget_it(tmp_path: Path) -> None:
    async def body() -> None:
        h = Harness(tmp_path)
        a = await h.donor("a")
        record = await h.placed()
        await h.fleet.cancel(record.workload_id)
        a.commands()
        await a.report(guest(record.workload_id, 1, STOPPED))
        await a.report(guest(record.workload_id, 1, STOPPED))
        stops = a.sent(link.StopWorkload)
        assert len(stops) == 1 and stops[0][1].reason == "not held by this donor"

    run(body)


# --- a donor's reports and results -------------------------------------------------------


def test_a_guest_reported_failed_fails_the_workload(tmp_path: Path) -> None:
    async def body() -> None:
        h = Harness(tmp_path)
        a = await h.donor("a")
        record = await h.placed()
        await a.report(link.GuestReport(record.workload_id, 1, FAILED, "qemu crashed"))
        failed = h.record(record.workload_id)
        assert failed.state is WorkloadState.FAILED and failed.detail == "qemu crashed"
        assert h.fleet.workload(record.workload_id) is None  # final: not kept in memory

    run(body)


def test_a_run_command_that_fails_fails_the_workload(tmp_path: Path) -> None:
    async def body() -> None:
        h = Harness(tmp_path)
        a = await h.donor("a")
        record = await h.placed()
        seq, _ = a.one(link.RunWorkload)
        await a.result(seq, ok=False, error="no such image")
        assert h.record(record.workload_id).state is WorkloadState.FAILED
        assert h.last_event(record.workload_id).detail == "no such image"

    run(body)


def test_a_reconnecting_donor_is_sent_again_what_it_was_assigned_and_does_not_report(
    tmp_path: Path,
) -> None:
    async def body() -> None:
        h = Harness(tmp_path)
        a = await h.donor("a")
        record = await h.placed()
        a.commands()
        a = await h.donor("a")  # the stream broke before RunWorkload arrived
        _, again = a.one(link.RunWorkload)
        assert (again.workload_id, again.epoch) == (record.workload_id, 1)

    run(body)


def test_the_first_event_must_be_a_hello_and_only_once(tmp_path: Path) -> None:
    async def body() -> None:
        h = Harness(tmp_path)
        await h.fleet.add_donor(DonorRecord("a", "a.example.org", CERT, h.clock()))
        session = await h.fleet.open_session("a", CERT)
        with pytest.raises(Refused, match="first event must be a hello"):
            await h.fleet.on_event(session, link.DonorEvent(1, link.Report(capacity())))
        hello = link.Hello("test", capacity())
        await h.fleet.on_event(session, link.DonorEvent(1, hello))
        with pytest.raises(Refused, match="sent twice"):
            await h.fleet.on_event(session, link.DonorEvent(2, hello))

    run(body)


def test_a_revoked_or_replaced_certificate_cannot_open_a_session(tmp_path: Path) -> None:
    async def body() -> None:
        h = Harness(tmp_path)
        await h.donor("a")
        with pytest.raises(Refused) as replaced:
            await h.fleet.open_session("a", "d" * 64)
        assert replaced.value.code is Code.UNAUTHENTICATED
        await h.fleet.revoke("a")
        with pytest.raises(Refused) as revoked:
            await h.fleet.open_session("a", CERT)
        assert revoked.value.code is Code.PERMISSION_DENIED

    run(body)


# --- moves -------------------------------------------------------------------------------


async def _running_on_a_with_b_idle(h: Harness) -> tuple[str, Donor, Donor]:
    a = await h.donor("a")
    record = await h.placed()
    await a.report(guest(record.workload_id, 1))
    b = await h.donor("b")
    a.commands()
    b.commands()
    return record.workload_id, a, b


def test_a_live_move_prepares_the_target_then_the_source_migrates_and_the_target_holds_it(
    tmp_path: Path,
) -> None:
    async def body() -> None:
        h = Harness(tmp_path)
        wid, a, b = await _running_on_a_with_b_idle(h)
        await a.event(link.Reclaim((wid,), "the owner is back"))
        assert h.record(wid).state is WorkloadState.EVACUATING
        seq, prepare = b.one(link.PrepareMigration)
        assert (prepare.source_donor_id, prepare.epoch) == ("a", 2)
        target = link.MigrationTarget("qemu+tls://b/system", "tcp://b", "k", "i", "c")
        await b.result(seq, prepared=target)
        seq, evacuate = a.one(link.Evacuate)
        assert (evacuate.target_donor_id, evacuate.target_epoch) == ("b", 2)
        await a.result(seq, migration=link.MigrationReport(1.5, 80))
        moved = h.record(wid)
        assert (moved.state, moved.donor_id, moved.epoch) == (WorkloadState.RUNNING, "b", 2)
        assert "downtime 80 ms" in moved.detail

    run(body)


def test_while_a_live_move_is_under_way_the_target_is_not_fenced_whatever_it_reports(
    tmp_path: Path,
) -> None:
    async def body() -> None:
        h = Harness(tmp_path)
        wid, a, b = await _running_on_a_with_b_idle(h)
        await a.event(link.Reclaim((wid,), "owner"))
        b.commands()
        await b.report(guest(wid, 2, FAILED))
        await b.report(guest(wid, 2, STOPPED))
        assert not b.sent(link.StopWorkload)
        assert h.record(wid).state is WorkloadState.EVACUATING

    run(body)


def test_a_target_reporting_the_guest_running_at_the_move_epoch_is_adopted_after_a_restart(
    tmp_path: Path,
) -> None:
    async def body() -> None:
        h = Harness(tmp_path)
        wid, a, _ = await _running_on_a_with_b_idle(h)
        await a.event(link.Reclaim((wid,), "owner"))
        await h.restart()  # the move in memory is lost
        b = await h.donor("b", guest(wid, 2))
        adopted = h.record(wid)
        assert (adopted.donor_id, adopted.epoch, adopted.state) == ("b", 2, WorkloadState.RUNNING)
        assert not b.sent(link.StopWorkload)

    run(body)


def test_a_move_whose_target_cannot_prepare_goes_cold_through_a_checkpoint(
    tmp_path: Path,
) -> None:
    async def body() -> None:
        h = Harness(tmp_path)
        wid, a, b = await _running_on_a_with_b_idle(h)
        await a.event(link.Reclaim((wid,), "owner"))
        seq, _ = b.one(link.PrepareMigration)
        await b.result(seq, ok=False, error="no libvirt TLS")
        _, forget = b.one(link.StopWorkload)
        assert forget.epoch == 2
        seq, save = a.one(link.Checkpoint)
        assert save.upload and not save.keep_running and save.epoch == 1
        info = await h.fleet.accept_checkpoint("a", wid, 1, "e" * 64, 1024)
        await a.result(seq, checkpoint=info)
        _, restore = b.one(link.RunWorkload)
        assert restore.checkpoint == info and restore.epoch == 3  # above the live attempt's
        assigned = h.record(wid)
        assert (assigned.state, assigned.donor_id) == (WorkloadState.ASSIGNED, "b")
        assert "no libvirt TLS" in h.last_event(wid).detail

    run(body)


def test_with_no_room_anywhere_the_guest_is_saved_and_requeued_with_its_checkpoint(
    tmp_path: Path,
) -> None:
    async def body() -> None:
        h = Harness(tmp_path)
        a = await h.donor("a")
        record = await h.placed()
        wid = record.workload_id
        await a.report(guest(wid, 1))
        a.commands()
        await a.event(link.Reclaim((wid,), "owner"))
        seq, save = a.one(link.Checkpoint)
        assert save.upload
        info = await h.fleet.accept_checkpoint("a", wid, 1, "e" * 64, 1024)
        await a.result(seq, checkpoint=info)
        requeued = h.record(wid)
        assert requeued.state is WorkloadState.QUEUED and requeued.checkpoint == info

    run(body)


def test_a_move_past_its_deadline_is_abandoned_and_the_guest_stays(tmp_path: Path) -> None:
    async def body() -> None:
        config = FleetConfig(lease_ttl=timedelta(hours=1), checkpoint_interval=None)
        h = Harness(tmp_path, config)
        wid, a, b = await _running_on_a_with_b_idle(h)
        await a.event(link.Reclaim((wid,), "owner"))
        b.commands()
        await h.tick(config.migration.deadline_s + 61)
        paused = h.record(wid)
        assert (paused.state, paused.donor_id, paused.epoch) == (WorkloadState.PAUSED, "a", 1)
        assert h.events(wid)[-1] == "move-abandoned"
        _, stop = b.one(link.StopWorkload)
        assert stop.reason == "move timed out"

    run(body)


def test_a_move_lost_by_a_restart_is_released_for_the_next_reclaim(tmp_path: Path) -> None:
    async def body() -> None:
        h = Harness(tmp_path)
        wid, a, _ = await _running_on_a_with_b_idle(h)
        await a.event(link.Reclaim((wid,), "owner"))
        await h.restart()
        await h.tick(LEASE.total_seconds() + 1)  # past the grace; nobody reported meanwhile
        assert h.events(wid)[-2:] == ["move-interrupted", "requeued"]

    run(body)


def test_an_admin_move_is_refused_for_a_workload_that_cannot_move(tmp_path: Path) -> None:
    async def body() -> None:
        h = Harness(tmp_path)
        wid, _, _ = await _running_on_a_with_b_idle(h)
        with pytest.raises(Refused, match="already runs it"):
            await h.fleet.move(wid, target="a")
        with pytest.raises(Refused, match="not connected"):
            await h.fleet.move(wid, target="nobody")
        await h.fleet.move(wid, target="b")
        with pytest.raises(Refused, match="is evacuating"):
            await h.fleet.move(wid)

    run(body)


def test_epochs_are_never_reused_after_an_abandoned_live_attempt(tmp_path: Path) -> None:
    async def body() -> None:
        h = Harness(tmp_path)
        wid, a, _b = await _running_on_a_with_b_idle(h)
        await a.event(link.Reclaim((wid,), "owner"))
        h.fleet.close_session(a.session)
        await h.tick(LEASE.total_seconds() + 1)
        assert h.record(wid).state is WorkloadState.QUEUED
        await h.fleet.place_queued()
        # Epoch 2 went to the live attempt on b: the new placement is above it.
        assert h.record(wid).epoch == 3

    run(body)


# --- checkpoints -------------------------------------------------------------------------


def test_only_the_holder_may_give_a_checkpoint_and_a_new_one_removes_the_old_file(
    tmp_path: Path,
) -> None:
    async def body() -> None:
        h = Harness(tmp_path)
        wid, _, _ = await _running_on_a_with_b_idle(h)
        with pytest.raises(Refused) as not_holder:
            await h.fleet.accept_checkpoint("b", wid, 1, "e" * 64, 1)
        assert not_holder.value.code is Code.PERMISSION_DENIED
        with pytest.raises(Refused):
            await h.fleet.accept_checkpoint("a", wid, 2, "e" * 64, 1)  # wrong epoch
        old = h.fleet.checkpoints.path("e" * 64)
        old.parent.mkdir(parents=True, exist_ok=True)
        old.write_bytes(b"old")
        await h.fleet.accept_checkpoint("a", wid, 1, "e" * 64, 3)
        await h.fleet.accept_checkpoint("a", wid, 1, "d" * 64, 3)
        assert not old.exists()
        assert h.fleet.checkpoint_to_pull("a", wid, 1, "d" * 64).sha256 == "d" * 64
        with pytest.raises(Refused):
            h.fleet.checkpoint_to_pull("a", wid, 1, "e" * 64)  # not the latest

    run(body)


def test_a_workload_running_for_the_interval_is_asked_for_a_periodic_checkpoint(
    tmp_path: Path,
) -> None:
    async def body() -> None:
        config = FleetConfig(lease_ttl=LEASE, checkpoint_interval=timedelta(minutes=15))
        h = Harness(tmp_path, config)
        a = await h.donor("a")
        record = await h.placed()
        await a.report(guest(record.workload_id, 1))
        a.commands()
        await h.tick(14 * 60)
        await a.report(guest(record.workload_id, 1))
        assert not a.sent(link.Checkpoint)
        await h.tick(61)
        _, periodic = a.one(link.Checkpoint)
        assert periodic.keep_running and periodic.upload

    run(body)


# --- admin -------------------------------------------------------------------------------


def test_cancel_stops_the_guest_and_is_final(tmp_path: Path) -> None:
    async def body() -> None:
        h = Harness(tmp_path)
        a = await h.donor("a")
        record = await h.placed()
        a.commands()
        cancelled = await h.fleet.cancel(record.workload_id)
        assert cancelled.state is WorkloadState.CANCELLED
        _, stop = a.one(link.StopWorkload)
        assert stop.reason == "cancelled"
        again = await h.fleet.cancel(record.workload_id)
        assert again.state is WorkloadState.CANCELLED and not a.sent(link.StopWorkload)

    run(body)


def test_revoking_a_donor_closes_its_session_and_requeues_what_it_held(tmp_path: Path) -> None:
    async def body() -> None:
        h = Harness(tmp_path)
        a = await h.donor("a")
        record = await h.placed()
        await h.fleet.revoke("a")
        assert a.session.closed and a.session.refusal is not None
        assert a.session.refusal.code is Code.PERMISSION_DENIED
        assert h.record(record.workload_id).state is WorkloadState.QUEUED
        assert not h.fleet.is_connected("a")

    run(body)


def test_draining_a_donor_moves_what_it_holds(tmp_path: Path) -> None:
    async def body() -> None:
        h = Harness(tmp_path)
        wid, _, b = await _running_on_a_with_b_idle(h)
        await h.fleet.drain("a")
        assert h.record(wid).state is WorkloadState.EVACUATING
        _, prepare = b.one(link.PrepareMigration)
        assert prepare.source_donor_id == "a"

    run(body)
