"""FleetWorkloads notes each guest move in the owner's journal: started or restored
here, arrived by live migration (once, from its source), left for its target, saved to
the coordinator, removed. Commands that fail or are resent note nothing.

The hypervisor is a small in-memory stand-in: these tests are about what is journaled,
not about libvirt (tests/integration covers the real calls)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import cast

import pytest

from donor_app.agent.link.journal import MoveJournal
from donor_app.agent.link.workloads import FleetWorkloads, WorkloadError
from donor_app.domain import link
from donor_app.domain.guest import GuestState
from donor_app.domain.vm import KernelBoot, VmSpec
from donor_app.hypervisor.errors import HypervisorError
from donor_app.hypervisor.host import Hypervisor
from donor_app.hypervisor.migration import MigrationOutcome, MigrationTarget
from donor_app.hypervisor.xml import BootFiles
from donor_app.settings.config import MigrationEndpoint

KERNEL = "a" * 64
SPEC = VmSpec("placeholder", 1, 256, KernelBoot(KERNEL))
SAVED = b"guest memory"


class FakeImages:
    def has(self, sha256: str) -> bool:
        return True


class FakeHypervisor:
    """Guests by name and state; a guest in `landing` is still arriving."""

    def __init__(self, root: Path) -> None:
        self.state_dir = root / "state"
        self.images = FakeImages()
        self.guests: dict[str, GuestState] = {}
        self.landing: set[str] = set()

    def guest_dir(self, guest: str) -> Path:
        return self.state_dir / "guests" / guest

    def exists(self, guest: str) -> bool:
        return guest in self.guests

    def arrived(self, guest: str) -> bool:
        return guest not in self.landing

    def state(self, guest: str) -> GuestState:
        if guest not in self.guests:
            error = HypervisorError("state", guest, "no such domain")
            error.not_found = True  # as libvirt's VIR_ERR_NO_DOMAIN sets it
            raise error
        return self.guests[guest]

    def has_managed_save(self, guest: str) -> bool:
        return False

    def create(self, spec: VmSpec) -> None:
        self.guests[spec.name] = GuestState.RUNNING

    def restore_elsewhere(
        self, spec: VmSpec, save_path: Path, *, disk_overlay: Path | None = None
    ) -> None:
        assert save_path.read_bytes() == SAVED
        self.guests[spec.name] = GuestState.RUNNING

    def destroy(self, guest: str) -> None:
        self.guests[guest] = GuestState.SHUTOFF

    def undefine(self, guest: str) -> None:
        del self.guests[guest]

    def save(self, guest: str, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(SAVED)
        self.guests[guest] = GuestState.SHUTOFF

    def restore(self, guest: str, path: Path) -> None:
        self.guests[guest] = GuestState.RUNNING

    def disk_overlay(self, guest: str) -> Path | None:
        return None  # kernel-boot guests: the save file is the whole checkpoint

    def prepare_files(self, spec: VmSpec) -> tuple[BootFiles, Path]:
        return BootFiles(kernel=Path("/k")), Path("/console")

    def migrate_live(
        self, guest: str, target: MigrationTarget, options: object
    ) -> MigrationOutcome:
        del self.guests[guest]
        return MigrationOutcome(seconds=2.34, downtime_ms=40.0, data_mib=300.0)


class FakeCheckpoints:
    def __init__(self) -> None:
        self.pushed: list[str] = []

    def push(self, workload_id: str, epoch: int, path: Path, sha256: str) -> link.CheckpointInfo:
        self.pushed.append(workload_id)
        return link.CheckpointInfo(sha256, path.stat().st_size, epoch, datetime.now(UTC), "d-here")

    def pull(self, workload_id: str, epoch: int, sha256: str) -> Iterator[bytes]:
        yield SAVED


class NoImages:
    def fetch(self, sha256: str) -> Iterator[bytes]:
        raise AssertionError("every image is cached")


class Donor:
    def __init__(self, root: Path) -> None:
        self.hv = FakeHypervisor(root)
        self.journal = MoveJournal(root / "fleet-moves.json")
        self.workloads = FleetWorkloads(
            cast(Hypervisor, self.hv),
            root / "fleet-workloads.json",
            lambda fn: fn(),
            MigrationEndpoint("qemu+tls://here/system", "tcp://here"),
            journal=self.journal,
        )
        self.checkpoints = FakeCheckpoints()

    def moves(self) -> list[tuple[str, str, str, str]]:
        """Oldest first: (event, guest, peer, detail)."""
        return [(m.event, m.guest, m.peer, m.detail) for m in reversed(self.journal.recent(50))]

    def run(self, workload_id: str, epoch: int = 1, **kwargs: object) -> None:
        command = link.RunWorkload(workload_id, epoch, SPEC, **kwargs)  # type: ignore[arg-type]
        self.workloads.run(command, NoImages(), self.checkpoints)


@pytest.fixture
def donor(tmp_path: Path) -> Donor:
    return Donor(tmp_path)


def test_a_fresh_start_and_a_restore_name_where_the_checkpoint_was_taken(donor: Donor) -> None:
    donor.run("w-1")
    checkpoint = link.CheckpointInfo(
        hashlib.sha256(SAVED).hexdigest(), len(SAVED), 4, datetime.now(UTC), "d-away"
    )
    donor.run("w-2", 5, checkpoint=checkpoint)
    assert donor.moves() == [("started", "w-1", "", ""), ("restored", "w-2", "d-away", "")]
    donor.run("w-1")  # resent: already running here
    assert len(donor.moves()) == 2


def test_a_run_that_fails_notes_nothing(donor: Donor) -> None:
    broken = link.CheckpointInfo("0" * 64, 1, 1, datetime.now(UTC), "d-away")
    with pytest.raises(WorkloadError):
        donor.run("w-1", checkpoint=broken)
    assert donor.moves() == []


def test_an_incoming_guest_is_noted_once_when_it_has_arrived(donor: Donor) -> None:
    prepare = link.PrepareMigration("w-1", 3, SPEC, source_donor_id="d-source")
    donor.workloads.prepare(prepare, NoImages())
    donor.hv.guests["w-1"] = GuestState.PAUSED
    donor.hv.landing.add("w-1")
    donor.workloads.reports()
    assert donor.moves() == []  # still arriving
    donor.hv.landing.clear()
    donor.hv.guests["w-1"] = GuestState.RUNNING
    donor.workloads.reports()
    donor.workloads.reports()
    assert donor.moves() == [("arrived", "w-1", "d-source", "live")]


def test_a_guest_that_left_names_its_target_and_how_long_it_took(donor: Donor) -> None:
    donor.run("w-1")
    target = link.MigrationTarget("qemu+tls://there/system", "tcp://there", "/k", "", "/c")
    donor.workloads.evacuate(link.Evacuate("w-1", 1, "d-target", target))
    assert donor.moves()[-1] == ("left", "w-1", "d-target", "live, 2.3 s")


def test_a_saved_guest_is_noted_but_a_periodic_checkpoint_is_not(donor: Donor) -> None:
    donor.run("w-1")
    donor.run("w-2")
    periodic = link.Checkpoint("w-1", 1, upload=True, keep_running=True)
    donor.workloads.checkpoint(periodic, donor.checkpoints)
    donor.workloads.checkpoint(link.Checkpoint("w-2", 1, upload=True), donor.checkpoints)
    assert donor.checkpoints.pushed == ["w-1", "w-2"]
    assert [m[:2] for m in donor.moves()] == [
        ("started", "w-1"),
        ("started", "w-2"),
        ("saved", "w-2"),
    ]


def test_a_removed_guest_carries_the_reason_and_a_resent_stop_adds_nothing(
    donor: Donor,
) -> None:
    donor.run("w-1")
    stop = link.StopWorkload("w-1", 1, "cancelled by admin")
    donor.workloads.stop(stop)
    donor.workloads.stop(stop)
    assert donor.moves() == [
        ("started", "w-1", "", ""),
        ("removed", "w-1", "", "cancelled by admin"),
    ]


def test_without_a_journal_the_workloads_work_as_before(tmp_path: Path) -> None:
    hv = FakeHypervisor(tmp_path)
    workloads = FleetWorkloads(cast(Hypervisor, hv), tmp_path / "fleet.json", lambda fn: fn())
    workloads.run(link.RunWorkload("w-1", 1, SPEC), NoImages())
    workloads.stop(link.StopWorkload("w-1", 1, "done"))
    assert hv.guests == {}
    assert not (tmp_path / "fleet-moves.json").exists()
