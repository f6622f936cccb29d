"""The suspend/resume duty cycle: when it suspends and resumes, that a new cap applies from
the next period, that it stops with the guest running, and that an error ends it.

The schedule is checked on a virtual clock, so it is exact and independent of the load
on the machine: the module's clock and stop event are replaced, every wait returns at
once having moved the clock on by what was asked, and the loop runs in the test's
thread. How closely a real thread keeps to it is measured by
tests/benchmarks/duty_cycle.py, not asserted here.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest

from donor_app.hypervisor import dutycycle
from donor_app.hypervisor.dutycycle import DutyCycler
from tests.waiting import wait_for

PERIOD_S = 0.1


class VirtualClock:
    def __init__(self) -> None:
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now


class VirtualStop:
    """Stands for the cycler's stop event: `wait(t)` moves the clock on by `t`, and is
    True (stopped) once the clock reaches `stop_at` or `set()` was called."""

    def __init__(self, clock: VirtualClock, stop_at: float) -> None:
        self._clock = clock
        self.stop_at = stop_at
        self._set = False

    def wait(self, timeout: float | None = None) -> bool:
        assert timeout is not None and timeout >= 0, "the cycle never waits without a bound"
        if self._set:
            return True
        if self._clock.now + timeout >= self.stop_at:
            self._clock.now = max(self._clock.now, self.stop_at)
            self._set = True
            return True
        self._clock.now += timeout
        return False

    def set(self) -> None:
        self._set = True

    def is_set(self) -> bool:
        return self._set


class InlineThread:
    """The cycler's thread, run to its end inside `start()` in the test's thread."""

    def __init__(self, target: Callable[[], None], name: str, daemon: bool) -> None:
        self._target = target

    def start(self) -> None:
        self._target()

    def is_alive(self) -> bool:
        return False


@dataclass
class RecordingGuest:
    """Notes each call with the virtual time it was made at; a call may take time."""

    clock: VirtualClock
    suspend_takes_s: float = 0.0
    calls: list[tuple[float, str]] = field(default_factory=list)
    running: bool = True
    on_resume: Callable[[int], None] | None = None

    def suspend(self) -> None:
        assert self.running, "suspend called on a paused guest"
        self.calls.append((self.clock.now, "suspend"))
        self.clock.now += self.suspend_takes_s
        self.running = False

    def resume(self) -> None:
        assert not self.running, "resume called on a running guest"
        self.calls.append((self.clock.now, "resume"))
        self.running = True
        if self.on_resume is not None:
            self.on_resume(sum(1 for _, call in self.calls if call == "resume"))

    def times(self, call: str) -> list[float]:
        return [at for at, made in self.calls if made == call]


@pytest.fixture
def clock() -> VirtualClock:
    return VirtualClock()


@pytest.fixture
def run_until(
    monkeypatch: pytest.MonkeyPatch, clock: VirtualClock
) -> Callable[[DutyCycler, float], None]:
    """Run a cycler made after this fixture on the virtual clock until `stop_at` s."""
    stops: list[VirtualStop] = []

    def event() -> VirtualStop:
        stops.append(VirtualStop(clock, stop_at=float("inf")))
        return stops[-1]

    monkeypatch.setattr(dutycycle, "time", SimpleNamespace(monotonic=clock.monotonic))
    monkeypatch.setattr(
        dutycycle,
        "threading",
        SimpleNamespace(Event=event, Thread=InlineThread, current_thread=threading.current_thread),
    )

    def run(cycler: DutyCycler, stop_at: float) -> None:
        stops[-1].stop_at = stop_at
        cycler.start()  # returns when the virtual clock reaches stop_at
        cycler.stop()

    return run


@pytest.mark.parametrize("percent", [20, 50, 80])
def test_each_period_runs_percent_of_it_then_suspends_until_the_next(
    clock: VirtualClock, run_until: Callable[[DutyCycler, float], None], percent: float
):
    guest = RecordingGuest(clock)
    run_until(DutyCycler("g", guest.suspend, guest.resume, percent, period_s=PERIOD_S), 1.0)
    on_s = PERIOD_S * percent / 100
    assert [call for _, call in guest.calls] == ["suspend", "resume"] * 10
    assert guest.times("suspend") == pytest.approx([k * PERIOD_S + on_s for k in range(10)])
    assert guest.times("resume") == pytest.approx([(k + 1) * PERIOD_S for k in range(10)])
    # Running from the start (and each resume) to the next suspend: the share of the 1 s.
    starts = [0.0, *guest.times("resume")[:-1]]
    ran = sum(stop - start for start, stop in zip(starts, guest.times("suspend"), strict=True))
    assert ran == pytest.approx(percent / 100)
    assert guest.running


def test_a_slow_suspend_does_not_shift_the_schedule(
    clock: VirtualClock, run_until: Callable[[DutyCycler, float], None]
):
    # Each period starts at its own time, not at the end of the last call: a suspend that
    # takes 30 ms eats into the pause, and the cycle does not drift.
    guest = RecordingGuest(clock, suspend_takes_s=0.03)
    run_until(DutyCycler("g", guest.suspend, guest.resume, 50, period_s=PERIOD_S), 0.5)
    assert guest.times("suspend") == pytest.approx([k * PERIOD_S + 0.05 for k in range(5)])
    assert guest.times("resume") == pytest.approx([(k + 1) * PERIOD_S for k in range(5)])


def test_a_new_cap_applies_from_the_next_period(
    clock: VirtualClock, run_until: Callable[[DutyCycler, float], None]
):
    guest = RecordingGuest(clock)
    cycler = DutyCycler("g", guest.suspend, guest.resume, 50, period_s=PERIOD_S)
    guest.on_resume = lambda resumes: cycler.set_percent(20) if resumes == 3 else None
    run_until(cycler, 0.6)
    assert cycler.percent == 20
    on_s = [0.05, 0.05, 0.05, 0.02, 0.02, 0.02]
    assert guest.times("suspend") == pytest.approx([k * PERIOD_S + on_s[k] for k in range(6)])


def test_stopping_while_it_runs_leaves_it_running_without_a_last_suspend(
    clock: VirtualClock, run_until: Callable[[DutyCycler, float], None]
):
    guest = RecordingGuest(clock)
    run_until(DutyCycler("g", guest.suspend, guest.resume, 50, period_s=PERIOD_S), 0.23)
    assert guest.calls[-1] == (pytest.approx(0.2), "resume")
    assert guest.running


def test_stopping_while_it_is_suspended_resumes_it_at_once(
    clock: VirtualClock, run_until: Callable[[DutyCycler, float], None]
):
    guest = RecordingGuest(clock)
    run_until(DutyCycler("g", guest.suspend, guest.resume, 50, period_s=PERIOD_S), 0.27)
    assert guest.calls[-2:] == [(pytest.approx(0.25), "suspend"), (pytest.approx(0.27), "resume")]
    assert guest.running


class AlternationCheck:
    """A guest on real threads that fails on a suspend/resume out of turn."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.running = True
        self.calls = 0
        self.errors: list[str] = []

    def _switch(self, running: bool) -> None:
        with self.lock:
            if self.running == running:
                self.errors.append(f"{'resume' if running else 'suspend'} out of turn")
            self.running = running
            self.calls += 1

    def suspend(self) -> None:
        self._switch(False)

    def resume(self) -> None:
        self._switch(True)


def test_on_its_own_thread_it_alternates_and_stops_with_the_guest_running():
    guest = AlternationCheck()
    cycler = DutyCycler("g", guest.suspend, guest.resume, 50, period_s=0.02)
    cycler.start()
    wait_for(lambda: guest.calls >= 6, 10, "three full cycles")
    cycler.stop()  # joins the thread: no call comes after it
    assert guest.errors == []
    assert guest.running, "stop() must leave the guest running"


def test_an_error_stops_the_cycle_and_is_reported():
    errors: list[Exception] = []

    def gone() -> None:
        raise RuntimeError("domain not found")

    cycler = DutyCycler("g", gone, lambda: None, 50, period_s=0.02, on_error=errors.append)
    cycler.start()
    wait_for(lambda: errors, 5, "the error to be reported")
    assert str(errors[0]) == "domain not found"
    cycler.stop()  # returns at once: the thread has ended


@pytest.mark.parametrize("bad", [0, 100, -5, 150])
def test_caps_that_need_no_cycle_are_refused(bad: float):
    with pytest.raises(ValueError, match="cpu cap"):
        DutyCycler("g", lambda: None, lambda: None, bad)
