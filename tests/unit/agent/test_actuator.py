"""Dividing host-wide caps among guests, and carrying decisions out on them."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from donor_app.agent.actuator import MIN_BALLOON_MIB, Actuator, guest_cpu_caps, guest_memory_caps
from donor_app.domain.decision import Cause, Decision, EffectiveCaps, Level
from donor_app.domain.guest import GuestInfo, GuestState, GuestUsage
from donor_app.hypervisor.errors import HypervisorError


def test_a_quarter_of_two_cores_is_half_a_core_for_one_vcpu():
    assert guest_cpu_caps(25, 2, {"a": 1}) == {"a": 50.0}


def test_cpu_is_shared_by_vcpus_and_never_passes_100():
    assert guest_cpu_caps(50, 4, {"a": 1, "b": 1}) == {"a": 100.0, "b": 100.0}
    assert guest_cpu_caps(50, 4, {"a": 2, "b": 2}) == {"a": 50.0, "b": 50.0}
    assert guest_cpu_caps(0, 4, {"a": 2}) == {"a": 0.0}
    assert guest_cpu_caps(50, 4, {}) == {}


@given(
    st.floats(0, 100),
    st.integers(1, 128),
    st.dictionaries(st.text(min_size=1, max_size=3), st.integers(1, 16), max_size=5),
)
def test_guests_together_never_get_more_than_the_host_cap(pct: float, cores: int, vcpus):
    caps = guest_cpu_caps(pct, cores, vcpus)
    used_cores = sum(caps[g] / 100 * vcpus[g] for g in vcpus)
    assert used_cores <= cores * pct / 100 + 0.05 * len(vcpus)  # rounding to 0.1 %
    assert all(0 <= c <= 100 for c in caps.values())


def test_memory_is_shared_by_size_within_each_guest():
    assert guest_memory_caps(1024, {"a": 1024, "b": 1024}) == {"a": 512, "b": 512}
    assert guest_memory_caps(100_000, {"a": 256}) == {"a": 256}
    assert guest_memory_caps(10, {"a": 256}) == {"a": MIN_BALLOON_MIB}


class FakeGuests:
    """Records calls; `fail` makes an operation raise for a guest."""

    def __init__(self, names: list[str]) -> None:
        self.states = dict.fromkeys(names, GuestState.RUNNING)
        self.caps: dict[str, float] = {}
        self.memory: dict[str, int] = {}
        self.calls: list[tuple[str, str]] = []
        self.fail: set[tuple[str, str]] = set()
        self.saved: set[str] = set()

    def _do(self, op: str, guest: str) -> None:
        self.calls.append((op, guest))
        if (op, guest) in self.fail:
            raise HypervisorError(op, guest, "simulated failure")

    def list_guests(self) -> list[str]:
        return sorted(self.states)

    def info(self, guest: str) -> GuestInfo:
        self._do("info", guest)
        return GuestInfo(1, 256)

    def state(self, guest: str) -> GuestState:
        return self.states[guest]

    def usage(self, guest: str) -> GuestUsage:
        return GuestUsage(0.0, 256.0, None, None)

    def suspend(self, guest: str) -> None:
        self._do("suspend", guest)
        self.states[guest] = GuestState.PAUSED

    def resume(self, guest: str) -> None:
        self._do("resume", guest)
        self.states[guest] = GuestState.RUNNING

    def set_cpu_cap(self, guest: str, percent: float) -> None:
        self._do("set_cpu_cap", guest)
        self.caps[guest] = percent

    def cpu_cap(self, guest: str) -> float:
        return self.caps.get(guest, 100.0)

    def set_memory_cap(self, guest: str, memory_mib: int) -> None:
        self._do("set_memory_cap", guest)
        self.memory[guest] = memory_mib

    def managed_save(self, guest: str) -> None:
        self._do("managed_save", guest)
        self.states[guest] = GuestState.SHUTOFF
        self.saved.add(guest)

    def has_managed_save(self, guest: str) -> bool:
        return guest in self.saved

    def start(self, guest: str) -> None:
        self._do("start", guest)
        self.saved.discard(guest)
        self.states[guest] = GuestState.RUNNING

    def guest_pids(self) -> list[int]:
        return []

    def console_path(self, guest: str) -> Path:
        return Path("/dev/null")


def _decision(level: Level, cpu: float = 50, memory: int = 4096) -> Decision:
    return Decision(level, Cause.IDLE, EffectiveCaps(cpu, memory), "test")


def test_pause_suspends_every_guest_and_nothing_else():
    guests = FakeGuests(["a", "b"])
    Actuator(guests).apply(_decision(Level.PAUSED), ["a", "b"], host_cores=2)
    assert guests.calls == [("suspend", "a"), ("suspend", "b")]


def test_run_caps_and_resumes_paused_guests():
    guests = FakeGuests(["a"])
    guests.states["a"] = GuestState.PAUSED
    Actuator(guests).apply(_decision(Level.RUN, cpu=25), ["a"], host_cores=2)
    assert guests.caps == {"a": 50.0}
    assert guests.states["a"] is GuestState.RUNNING
    assert guests.memory == {"a": 256}


def test_checkpoint_saves_and_running_again_restores():
    guests = FakeGuests(["a"])
    actuator = Actuator(guests)
    actuator.apply(_decision(Level.CHECKPOINT), ["a"], host_cores=2)
    assert guests.states["a"] is GuestState.SHUTOFF and "a" in guests.saved
    actuator.apply(_decision(Level.RUN), ["a"], host_cores=2)
    assert guests.states["a"] is GuestState.RUNNING and ("start", "a") in guests.calls


def test_a_stopped_guest_without_checkpoint_is_left_alone():
    guests = FakeGuests(["a"])
    guests.states["a"] = GuestState.SHUTOFF
    Actuator(guests).apply(_decision(Level.RUN), ["a"], host_cores=2)
    assert ("start", "a") not in guests.calls


def test_one_failing_guest_does_not_stop_the_others(caplog: pytest.LogCaptureFixture):
    guests = FakeGuests(["a", "b"])
    guests.fail.add(("suspend", "a"))
    actuator = Actuator(guests)
    for _ in range(3):
        actuator.apply(_decision(Level.PAUSED), ["a", "b"], host_cores=2)
    assert guests.states["b"] is GuestState.PAUSED
    failures = [r for r in caplog.records if "simulated failure" in r.getMessage()]
    assert len(failures) == 1, "a repeated failure is logged once"
