"""The agent end to end: a real donor-agent process, a real QEMU guest, real input.

Under Xvfb, xdotool types a key; the agent's input listener sees it and the guest is
paused (libvirt says so, and the guest's serial counter stops); after `idle_after` with
no input the guest runs again (the counter moves on from where it stopped). SIGTERM
stops the agent cleanly and leaves the guest paused, not lost.
"""

from __future__ import annotations

import signal
import subprocess
import time

import pytest

from donor_app.domain.decision import Cause, Level
from tests.agent_process import running_agent
from tests.guests import console_ticks
from tests.waiting import wait_for
from tests.xvfb import running_xvfb

pytestmark = [pytest.mark.slow, pytest.mark.qemu]

# Only the owner's input may pause the guest here: the test machine's own load (other
# tests, QEMU under TCG) must not count as the owner's programs being busy.
SETTINGS = "idle_after = 3\n[owner_load]\npause_above_percent = 100\nresume_below_percent = 99\n"


def _guest_state(agent) -> str:  # type: ignore[no-untyped-def]
    status = agent.client.status()
    return next(g.state for g in status.guests if g.name == "demo")


def test_input_pauses_the_guest_and_idleness_resumes_it():
    with running_xvfb() as display, running_agent(SETTINGS, display=display) as agent:
        ticking = wait_for(lambda: console_ticks(agent.console), 60, "the guest's counter")
        assert agent.client.status().decision.level is Level.RUN

        subprocess.run(
            ["xdotool", "key", "--delay", "0", "shift"], env={"DISPLAY": display}, check=True
        )
        wait_for(lambda: _guest_state(agent) == "paused", 5, "the guest to be paused")
        status = agent.client.status()
        assert status.decision.cause is Cause.OWNER_ACTIVE
        assert "using this computer" in status.decision.reason

        # While paused the counter stands still (observed over one second).
        before = console_ticks(agent.console)[-1]
        time.sleep(1.0)
        assert console_ticks(agent.console)[-1] <= before + 1  # one line may be in flight

        wait_for(lambda: _guest_state(agent) == "running", 15, "the guest to resume")
        after = wait_for(
            lambda: [t for t in console_ticks(agent.console) if t > before + 3],
            30,
            "the counter to move on",
        )
        ticks = console_ticks(agent.console)
        assert ticks == sorted(ticks), "the counter went backwards: the guest lost its state"
        assert after[0] > ticking[0]


def test_sigterm_stops_cleanly_and_leaves_the_guest_paused():
    with running_agent(SETTINGS) as agent:
        wait_for(lambda: console_ticks(agent.console), 60, "the guest's counter")
        agent.process.send_signal(signal.SIGTERM)
        assert agent.process.wait(timeout=30) == 0
        log = agent.log_text()
        assert "guests are left paused" in log
        assert "Traceback" not in log
        last = console_ticks(agent.console)[-1]
        time.sleep(1.0)  # observation window: a paused guest prints nothing
        assert console_ticks(agent.console)[-1] <= last + 1
