"""The suspend/resume duty cycle: its on/off ratio follows the cap; it stops cleanly."""

from __future__ import annotations

import threading
import time

import pytest

from donor_app.hypervisor.dutycycle import DutyCycler
from tests.waiting import wait_for


class FakeGuest:
    """Records how long it ran and was paused; thread-safe like libvirt's calls."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.running = True
        self.since = time.monotonic()
        self.ran = 0.0
        self.paused = 0.0
        self.calls = 0

    def _switch(self, running: bool) -> None:
        with self.lock:
            now = time.monotonic()
            assert self.running != running, "suspend/resume called in the wrong state"
            if self.running:
                self.ran += now - self.since
            else:
                self.paused += now - self.since
            self.running, self.since = running, now
            self.calls += 1

    def suspend(self) -> None:
        self._switch(False)

    def resume(self) -> None:
        self._switch(True)


@pytest.mark.parametrize("percent", [20, 50, 80])
def test_the_run_share_follows_the_cap(percent: float):
    guest = FakeGuest()
    cycler = DutyCycler("g", guest.suspend, guest.resume, percent, period_s=0.05)
    cycler.start()
    wait_for(lambda: guest.calls >= 40, 10, "20 full cycles")
    cycler.stop()
    share = guest.ran / (guest.ran + guest.paused)
    assert share == pytest.approx(percent / 100, abs=0.08)
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
