"""The agent's coordinator link against a real coordinator, with libvirt's test:///
driver as the donor's hypervisor: enrollment (token consumed, credentials kept), running
and stopping workloads by command (images fetched and verified), re-enrollment when the
coordinator forgot us, and fencing when the lease cannot be renewed."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from donor_app.agent.link.connection import CoordinatorLink
from donor_app.agent.link.journal import MoveJournal
from donor_app.agent.link.workloads import FleetWorkloads
from donor_app.coordinator.fleet import FleetConfig
from donor_app.domain.decision import Cause, Decision, EffectiveCaps, Level
from donor_app.domain.status import AgentStatus, GuestMove, LinkStatus
from donor_app.hypervisor.host import Hypervisor
from donor_app.hypervisor.images import ImageCache
from donor_app.proto.v1 import coordinator_pb2 as pb
from donor_app.settings.config import LinkConfig
from donor_app.settings.secrets import CredentialStore
from tests.coordinator_helpers import RunningCoordinator, running_coordinator
from tests.guests import add_tiny_guest
from tests.waiting import wait_for


@pytest.fixture(autouse=True)
def _no_keyring(monkeypatch: pytest.MonkeyPatch) -> None:
    import keyring
    from keyring.backends import fail

    previous = keyring.get_keyring()
    keyring.set_keyring(fail.Keyring())
    yield
    keyring.set_keyring(previous)


@dataclass
class FakeEngine:
    """The engine's side of the link: a status to read, calls recorded. The hypervisor
    calls run inline (the real engine runs them on its thread)."""

    status_now: AgentStatus
    links: list[LinkStatus] = field(default_factory=list)
    held: list[frozenset[str]] = field(default_factory=list)
    moves: list[tuple[GuestMove, ...]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def status(self) -> AgentStatus:
        return self.status_now

    def set_link_status(self, link: LinkStatus) -> None:
        with self.lock:
            self.links.append(link)

    def hold_paused(self, names: frozenset[str]) -> None:
        with self.lock:
            self.held.append(names)

    def set_moves(self, moves: tuple[GuestMove, ...]) -> None:
        with self.lock:
            self.moves.append(moves)

    def latest_moves(self) -> list[tuple[str, str]]:
        """(event, guest) of the moves last published, newest first."""
        with self.lock:
            return [(m.event, m.guest) for m in self.moves[-1]] if self.moves else []

    @staticmethod
    def call(fn: Callable[[], object]) -> object:
        return fn()

    @property
    def link(self) -> LinkStatus:
        with self.lock:
            return self.links[-1] if self.links else LinkStatus()


def _idle_status() -> AgentStatus:
    decision = Decision(Level.RUN, Cause.IDLE, EffectiveCaps(100.0, 4096), "idle")
    return AgentStatus(at=datetime.now(UTC), decision=decision, guests=())


@dataclass
class Donor:
    hv: Hypervisor
    engine: FakeEngine
    credentials: CredentialStore
    workloads: FleetWorkloads
    root: Path
    journal: MoveJournal

    def link(
        self, coordinator: RunningCoordinator, token: str | None, token_file: Path | None = None
    ) -> CoordinatorLink:
        config = LinkConfig(
            address=coordinator.endpoints.address,
            enroll_address=coordinator.endpoints.enroll_address,
            ca_pem=coordinator.ca_pem,
            token=token,
            token_file=token_file,
        )
        return CoordinatorLink(
            config,
            self.credentials,
            self.workloads,
            status=self.engine.status,
            set_link_status=self.engine.set_link_status,
            hold_paused=self.engine.hold_paused,
            hostname="link-test",
        )


@pytest.fixture
def donor(tmp_path: Path) -> Iterator[Donor]:
    node = tmp_path / "node.xml"
    node.write_text("<node/>\n")
    hv = Hypervisor.open(
        f"test://{node}", images=ImageCache(tmp_path / "donor-images"), state_dir=tmp_path / "state"
    )
    engine = FakeEngine(_idle_status())
    # As the agent wires it (donor_app/agent/main.py): each move reaches the engine.
    journal = MoveJournal(tmp_path / "fleet-moves.json", on_change=engine.set_moves)
    workloads = FleetWorkloads(hv, tmp_path / "fleet-workloads.json", engine.call, journal=journal)
    try:
        yield Donor(hv, engine, CredentialStore(tmp_path / "data"), workloads, tmp_path, journal)
    finally:
        hv.close()


@pytest.fixture
def coordinator_fleet() -> FleetConfig:
    """Short leases, so that a donor that loses its coordinator holds its guests soon."""
    return FleetConfig(lease_ttl=timedelta(seconds=2), report_interval=timedelta(seconds=1))


def _submit(coordinator: RunningCoordinator, tmp_path: Path, name: str = "job") -> pb.Workload:
    cache = ImageCache(tmp_path / "admin-images")
    kernel, initrd = add_tiny_guest(cache)
    with coordinator.admin() as admin:
        spec = pb.WorkloadSpec(
            name=name,
            vcpus=1,
            memory_mib=256,
            kernel=pb.KernelBoot(
                kernel_sha256=admin.upload_image(cache.path(kernel)),
                initrd_sha256=admin.upload_image(cache.path(initrd)),
            ),
        )
        return admin.submit(spec)


def _state(coordinator: RunningCoordinator, workload_id: str) -> int:
    with coordinator.admin() as admin:
        return next(w.state for w in admin.workloads() if w.id == workload_id)


def test_enrolls_once_runs_and_stops_a_workload(
    donor: Donor, coordinator: RunningCoordinator, tmp_path: Path
) -> None:
    with coordinator.admin() as admin:
        token = admin.create_token(3600, 1).token
    token_file = tmp_path / "enroll-token"
    token_file.write_text(token)
    link = donor.link(coordinator, token, token_file)
    link.start()
    try:
        wait_for(lambda: donor.engine.link.state == "connected", 30, "the link connected")
        creds = donor.credentials.load()
        assert creds is not None and creds.donor_id == donor.engine.link.donor_id
        assert not token_file.exists()  # a used token does not stay on disk

        workload = _submit(coordinator, tmp_path)
        wait_for(
            lambda: _state(coordinator, workload.id) == pb.WORKLOAD_STATE_RUNNING,
            30,
            "the workload reported running",
        )
        assert donor.hv.list_guests() == [workload.id]
        # The images came from the coordinator and were verified into the donor's cache.
        assert all(donor.hv.images.has(sha) for sha in (workload.spec.kernel.kernel_sha256,))
        # The owner's journal says it started here, and the engine's status carries it.
        assert donor.engine.latest_moves() == [("started", workload.id)]

        with coordinator.admin() as admin:
            admin.cancel(workload.id)
        wait_for(lambda: donor.hv.list_guests() == [], 30, "the cancelled guest removed")
        # stop() journals the removal after it let go of the workload: once journaled, it
        # holds nothing (asserting right after the guest vanished raced with stop()).
        wait_for(lambda: len(donor.engine.latest_moves()) == 2, 10, "the removal journaled")
        assert donor.workloads.names() == frozenset()
        assert donor.engine.latest_moves() == [
            ("removed", workload.id),
            ("started", workload.id),
        ]
        # Kept for the next agent run: the tray shows them again after a restart.
        kept = MoveJournal(donor.root / "fleet-moves.json").recent()
        assert [(m.event, m.guest) for m in kept] == donor.engine.latest_moves()
        assert kept[0].detail  # the coordinator's reason for the removal
    finally:
        link.stop()


def test_after_a_restart_the_agent_reconnects_without_a_token(
    donor: Donor, coordinator: RunningCoordinator, tmp_path: Path
) -> None:
    with coordinator.admin() as admin:
        token = admin.create_token(3600, 1).token
    first = donor.link(coordinator, token)
    first.start()
    wait_for(lambda: donor.engine.link.state == "connected", 30, "the first link connected")
    donor_id = donor.engine.link.donor_id
    first.stop()

    second = donor.link(coordinator, None)  # the token is spent; credentials suffice
    second.start()
    try:
        wait_for(
            lambda: donor.engine.link.state == "connected" and len(donor.engine.links) > 3,
            30,
            "the second link connected",
        )
        assert donor.engine.link.donor_id == donor_id
    finally:
        second.stop()


def test_guests_found_at_start_stay_paused_until_the_coordinator_renews_their_lease(
    donor: Donor, coordinator: RunningCoordinator, tmp_path: Path
) -> None:
    """The agent died and came back; its guest ran on meanwhile. Until the coordinator
    says the lease still holds, the guest must not run: it may run elsewhere by now."""
    with coordinator.admin() as admin:
        token = admin.create_token(3600, 1).token
    first = donor.link(coordinator, token)
    first.start()
    workload = _submit(coordinator, tmp_path)
    wait_for(
        lambda: _state(coordinator, workload.id) == pb.WORKLOAD_STATE_RUNNING,
        30,
        "the workload running",
    )
    first.stop()
    assert donor.engine.held == []  # nothing was held while the lease was renewed

    restarted = FleetWorkloads(donor.hv, tmp_path / "fleet-workloads.json", donor.engine.call)
    donor.workloads = restarted
    second = donor.link(coordinator, None)
    second.start()
    try:
        assert donor.engine.held == [frozenset({workload.id})]  # at once, before any Ack
        wait_for(lambda: donor.engine.held[-1] == frozenset(), 30, "the guest released")
        assert donor.engine.link.state == "connected"
    finally:
        second.stop()


def test_a_refused_token_is_reported_not_retried_in_a_loop(
    donor: Donor, coordinator: RunningCoordinator
) -> None:
    link = donor.link(coordinator, "dtk_0000000000000000_" + "x" * 43)
    link.start()
    try:
        wait_for(lambda: donor.engine.link.state == "refused", 30, "the refusal shown")
        assert "token" in donor.engine.link.detail
        assert donor.credentials.load() is None
    finally:
        link.stop()


def test_a_lease_that_cannot_be_renewed_holds_the_fleet_guests_paused(
    donor: Donor, tmp_path: Path, coordinator_fleet: FleetConfig
) -> None:
    # A coordinator of the test's own: it goes away mid-test.
    with running_coordinator(tmp_path / "coordinator", fleet=coordinator_fleet) as coordinator:
        with coordinator.admin() as admin:
            token = admin.create_token(3600, 1).token
        link = donor.link(coordinator, token)
        link.start()
        workload = _submit(coordinator, tmp_path)
        wait_for(
            lambda: _state(coordinator, workload.id) == pb.WORKLOAD_STATE_RUNNING,
            30,
            "the workload running",
        )
    # The coordinator is gone: no Ack renews the lease any more.
    try:
        held = wait_for(
            lambda: [h for h in donor.engine.held if h], 30, "the guests held after the lease"
        )
        assert held[0] == frozenset({workload.id})
        assert donor.engine.link.state == "disconnected"
    finally:
        link.stop()
