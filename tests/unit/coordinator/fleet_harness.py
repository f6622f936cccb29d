"""A fleet on a fake clock and an in-memory store, with donors driven by hand.

The fleet's rules (leases, fencing, placement, moves) run here in milliseconds: store
calls run inline (no worker thread), time moves only when a test says so, and a donor
is a `DonorSession` whose commands the test reads from its outbox. The real-time,
real-gRPC tests (tests/integration/test_coordinator_*.py) remain the contract.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

from donor_app.coordinator.fleet import Fleet, FleetConfig
from donor_app.coordinator.fleet.session import DonorSession
from donor_app.coordinator.images import ImageStore
from donor_app.coordinator.store.memory import InMemoryStore
from donor_app.domain import link
from donor_app.domain.decision import Level
from donor_app.domain.records import DonorRecord, WorkloadEvent, WorkloadRecord, WorkloadState
from donor_app.domain.vm import KernelBoot, VmSpec

T0 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
LEASE = timedelta(seconds=30)
CERT = "c" * 64

_T = TypeVar("_T")


class FakeClock:
    def __init__(self, start: datetime = T0) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


async def inline(func: Callable[..., _T], /, *args: Any, **kwargs: Any) -> _T:
    return func(*args, **kwargs)


def capacity(cores: int = 4, memory_mib: int = 8192, idle: bool = True) -> link.Capacity:
    return link.Capacity(
        cores=cores,
        memory_mib=memory_mib,
        arch="x86_64",
        lend_cpu_percent=100.0,
        lend_memory_mib=memory_mib,
        idle=idle,
    )


@dataclass
class Donor:
    """One donor's end of a session: what the fleet sent it, and what it says."""

    fleet: Fleet
    session: DonorSession
    seq: int = 0
    received: list[link.CoordinatorMessage] = field(default_factory=list)

    @property
    def donor_id(self) -> str:
        return self.session.donor_id

    def commands(self) -> list[link.Command]:
        """Commands sent since the last call (Acks and the Welcome included)."""
        out: list[link.Command] = []
        while not self.session.outbox.empty():
            item = self.session.outbox.get_nowait()
            if item is not None:
                out.append(item)
                self.received.append(item.message)
        return out

    def sent(self, kind: type[_T]) -> list[tuple[int, _T]]:
        """(seq, message) of the commands of `kind` sent since the last read."""
        return [(c.seq, c.message) for c in self.commands() if isinstance(c.message, kind)]

    def one(self, kind: type[_T]) -> tuple[int, _T]:
        found = self.sent(kind)
        assert len(found) == 1, f"expected one {kind.__name__}, got {found}"
        return found[0]

    async def event(self, message: link.DonorMessage) -> None:
        self.seq += 1
        await self.fleet.on_event(self.session, link.DonorEvent(self.seq, message))
        await self.fleet.settle()

    async def hello(self, *guests: link.GuestReport, cap: link.Capacity | None = None) -> None:
        await self.event(link.Hello("test", cap or capacity(), tuple(guests)))

    async def report(
        self,
        *guests: link.GuestReport,
        level: Level | None = None,
        cap: link.Capacity | None = None,
    ) -> None:
        await self.event(link.Report(cap or capacity(), tuple(guests), level))

    async def result(self, seq: int, ok: bool = True, **kw: Any) -> None:
        await self.event(link.CommandResult(seq, ok, **kw))


def guest(
    workload_id: str, epoch: int, state: link.GuestState = link.GuestState.RUNNING
) -> link.GuestReport:
    return link.GuestReport(workload_id, epoch, state)


class Harness:
    """A fleet with a fake clock; donors are enrolled and connected by `donor()`."""

    def __init__(self, tmp_path: Path, config: FleetConfig | None = None) -> None:
        self.clock = FakeClock()
        self.store = InMemoryStore()
        self.images = ImageStore(tmp_path / "images")
        self.config = config or FleetConfig(lease_ttl=LEASE, checkpoint_interval=None)
        self.fleet = self._new_fleet()
        kernel = self.add_image(b"kernel")
        initrd = self.add_image(b"initrd")
        self.boot = KernelBoot(kernel_sha256=kernel, initrd_sha256=initrd, cmdline="console=ttyS0")

    def _new_fleet(self) -> Fleet:
        return Fleet(self.store, self.images, self.config, clock=self.clock, io=inline)

    async def restart(self) -> None:
        """A new coordinator process on the same store: memory (sessions, moves) lost."""
        await self.fleet.flush()
        self.fleet = self._new_fleet()
        await self.fleet.load()

    def add_image(self, content: bytes) -> str:
        sha = hashlib.sha256(content).hexdigest()
        path = self.images.path(sha)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        return sha

    def spec(self, name: str = "job", memory_mib: int = 256) -> VmSpec:
        return VmSpec(name=name, vcpus=1, memory_mib=memory_mib, boot=self.boot)

    async def donor(
        self, donor_id: str, *guests: link.GuestReport, cap: link.Capacity | None = None
    ) -> Donor:
        if self.store.get_donor(donor_id) is None:
            await self.fleet.add_donor(
                DonorRecord(donor_id, f"{donor_id}.example.org", CERT, self.clock())
            )
        session = await self.fleet.open_session(donor_id, CERT)
        donor = Donor(self.fleet, session)
        await donor.hello(*guests, cap=cap)
        return donor

    async def submit(self, name: str = "job", memory_mib: int = 256) -> WorkloadRecord:
        return await self.fleet.submit(self.spec(name, memory_mib), priority=0)

    async def placed(self, name: str = "job", memory_mib: int = 256) -> WorkloadRecord:
        """Submit and place; returns the record as placed."""
        record = await self.submit(name, memory_mib)
        assert await self.fleet.place_queued() == 1
        placed = self.record(record.workload_id)
        assert placed.state is WorkloadState.ASSIGNED
        return placed

    def record(self, workload_id: str) -> WorkloadRecord:
        """The stored record (the truth across restarts)."""
        stored = self.store.get_workload(workload_id)
        assert stored is not None
        return stored

    def events(self, workload_id: str) -> list[str]:
        return [e.kind for e in self.store.workload_events(workload_id)]

    def last_event(self, workload_id: str) -> WorkloadEvent:
        return self.store.workload_events(workload_id)[-1]

    async def tick(self, seconds: float) -> None:
        """Time passes; the fleet's periodic steps run once."""
        self.clock.advance(seconds)
        await self.fleet.flush()
        await self.fleet.sweep()
        await self.fleet.settle()


def run(test: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(test())
