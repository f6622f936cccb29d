"""The tray end to end: Xvfb, a real tray host (trayer), a real donor-agent with the tiny
guest, and donor-app as the owner runs it.

The owner's input reaches the agent through the tray (the agent here has no display of
its own); the menu is opened by clicking the icon with xdotool and "Pause for 1 hour"
chosen in it; the agent is then snoozed and the icon turns to the snoozed one. Screenshots
of the tray, the open menu, the settings dialog and the activity window are saved under
docs/screenshots/ for the README.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from donor_app.domain.decision import Cause, Level
from tests.agent_process import AgentProcess, running_agent
from tests.gui.x11 import X11, Box, colour_share, painted, start_tray_host
from tests.waiting import wait_for
from tests.xvfb import running_xvfb

pytestmark = [pytest.mark.slow, pytest.mark.qemu]

SCREENSHOTS = Path(__file__).resolve().parents[2] / "docs" / "screenshots"

# Windows covering the whole week, so the guest donates whenever the test runs, and the
# schedule editor has something to show.
# [owner_load]: only the owner's input may pause the guest; the test machine's own load
# must not count as the owner's programs being busy.
SETTINGS = """\
idle_after = 3
[owner_load]
pause_above_percent = 100
resume_below_percent = 99
[caps.in_use]
cpu_percent = 25
memory_percent = 50
[caps.idle]
cpu_percent = 100
memory_percent = 50
[[schedule]]
label = "office hours"
days = ["mon", "tue", "wed", "thu", "fri"]
start = "09:00"
end = "17:00"
[schedule.caps.idle]
cpu_percent = 50
memory_percent = 25
[[schedule]]
label = "evenings and nights"
days = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
start = "17:00"
end = "09:00"
[[schedule]]
label = "weekends"
days = ["sat", "sun"]
start = "09:00"
end = "17:00"
"""

SNOOZED_PURPLE = (0x7B, 0x4F, 0xC9)


@contextmanager
def running_tray(
    display: str, agent: AgentProcess
) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    root = Path(tempfile.mkdtemp(prefix="dt-", dir="/tmp"))
    (root / "run").mkdir(mode=0o700)
    env = dict(os.environ)
    env.pop("QT_QPA_PLATFORM", None)  # the real xcb platform, not offscreen
    env.update(
        DISPLAY=display,
        DBUS_SESSION_BUS_ADDRESS="disabled:",
        HOME=str(root),
        XDG_RUNTIME_DIR=str(root / "run"),
        XDG_CONFIG_HOME=str(root / "config"),
        XDG_DATA_HOME=str(root / "data"),
    )
    log = root / "tray.log"
    command = [
        sys.executable, "-m", "donor_app.gui",
        "--socket", str(agent.client.socket_path), "--no-start-agent",
    ]  # fmt: skip
    with log.open("wb") as output:
        process = subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT)
    try:
        yield process, log
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def open_menu(x11: X11, icon: Box) -> Box:
    """Click the icon (right button: the context menu) and wait for the menu."""
    # A menu that is still closing holds the pointer grab: a click then only closes it.
    wait_for(lambda: not _menus(x11), 10, "the previous menu to close")
    # Observed with Qt 6 xcb under trayer: the first press on the icon after its menu
    # was closed from the keyboard is dropped (a second press opens it, at any delay).
    # So click as a person would: again, if nothing opened.
    for _ in range(3):
        x11.click(*icon.centre, button=3)
        try:
            return wait_for(lambda: _menu(x11), 2, "the tray menu to open")
        except AssertionError:
            continue
    try:
        return wait_for(lambda: _menu(x11), 5, "the tray menu to open")
    except AssertionError as failure:
        shot = x11.screenshot(Path(tempfile.mkdtemp(prefix="tray-e2e-")) / "screen.png")
        raise AssertionError(f"{failure}; the screen is in {shot}") from None


def _menus(x11: X11) -> list[Box]:
    return [box for box in x11.popup_menus() if box.height > 150]  # not a tooltip


def _menu(x11: X11) -> Box | None:
    menus = _menus(x11)
    return menus[0] if menus and painted(x11, menus[0]) else None


def _status(agent: AgentProcess):  # type: ignore[no-untyped-def]
    return agent.client.status()


def test_the_tray_shows_the_agent_and_pauses_it_for_an_hour() -> None:
    with (
        running_xvfb() as display,
        running_agent(SETTINGS) as agent,
    ):
        trayer = start_tray_host(display)
        x11 = X11(display)
        try:
            with running_tray(display, agent) as (tray, log):
                icon = wait_for(
                    lambda: x11.embedded_icon("donor_app") or tray.poll() is not None,
                    30,
                    "the icon in the tray",
                )
                assert tray.poll() is None, log.read_text()
                wait_for(lambda: "tray state: " in log.read_text(), 30, "the tray to connect")
                wait_for(
                    lambda: _status(agent).decision.level is Level.RUN, 60, "the guest to donate"
                )
                wait_for(
                    lambda: (
                        "tray state: limited" in log.read_text()
                        or "tray state: donating" in log.read_text()
                    ),
                    30,
                    "the icon to show donating",
                )

                # Owner input, seen by the tray's listener, forwarded: the agent pauses.
                x11.xdotool("key", "--delay", "0", "shift")
                wait_for(
                    lambda: _status(agent).decision.cause is Cause.OWNER_ACTIVE,
                    5,
                    "the agent to hear of the owner's input through the tray",
                )
                wait_for(lambda: _status(agent).decision.level is Level.RUN, 30, "donating again")

                # The tray with its tooltip: what is lent and why.
                x11.xdotool("mousemove", *map(str, icon.centre))
                tip = wait_for(
                    lambda: [b for b in x11.popup_menus() if painted(x11, b)], 10, "the tooltip"
                )[0]
                x11.screenshot(SCREENSHOTS / "tray.png", icon.union(tip).grown(12, x11.screen_box))

                menu = open_menu(x11, icon)
                x11.screenshot(SCREENSHOTS / "menu.png", icon.union(menu).grown(12, x11.screen_box))
                x11.xdotool("key", "--delay", "0", "1")  # "Pause for &1 hour"
                status = wait_for(
                    lambda: (s := _status(agent)).decision.cause is Cause.SNOOZED and s,
                    10,
                    "the agent to be snoozed",
                )
                assert status.decision.level is Level.PAUSED
                assert status.snoozed_until is not None
                expected = datetime.now().astimezone() + timedelta(hours=1)
                assert abs((status.snoozed_until - expected).total_seconds()) < 30
                wait_for(
                    lambda: colour_share(x11, icon, SNOOZED_PURPLE) > 0.3,
                    10,
                    "the icon to turn to the snoozed one",
                )

                menu = open_menu(x11, icon)
                x11.xdotool("key", "--delay", "0", "u")  # "Res&ume donating"
                wait_for(lambda: _status(agent).decision.cause is not Cause.SNOOZED, 10, "resumed")

                open_menu(x11, icon)
                x11.xdotool("key", "--delay", "0", "s")  # "&Settings…"
                settings = wait_for(
                    lambda: (
                        (b := x11.window_named("donor_app — Settings")) and painted(x11, b) and b
                    ),
                    20,
                    "the settings dialog",
                )
                x11.screenshot(SCREENSHOTS / "settings.png", settings)
                x11.focus("donor_app — Settings")
                x11.xdotool("key", "--delay", "0", "ctrl+Tab")  # the Schedule tab
                wait_for(lambda: _has_grid(x11, settings), 10, "the schedule tab")
                x11.screenshot(SCREENSHOTS / "settings-schedule.png", settings)
                x11.xdotool("key", "--delay", "0", "Escape")  # Cancel
                wait_for(
                    lambda: x11.window_named("donor_app — Settings") is None, 10, "it to close"
                )

                open_menu(x11, icon)
                x11.xdotool("key", "--delay", "0", "a")  # "&Activity…"
                activity = wait_for(
                    lambda: (
                        (b := x11.window_named("donor_app — Activity")) and painted(x11, b) and b
                    ),
                    20,
                    "the activity window",
                )
                x11.screenshot(SCREENSHOTS / "activity.png", activity)

                tray.send_signal(signal.SIGTERM)
                assert tray.wait(timeout=30) == 0
                text = log.read_text()
                assert "Traceback" not in text, text
                assert "tray state: snoozed" in text
        finally:
            x11.close()
            trayer.terminate()
            trayer.wait(timeout=10)


def _has_grid(x11: X11, box: Box) -> bool:
    """The schedule tab is up when the office-hours green shows in the dialog."""
    return colour_share(x11, box, (0x2E, 0x9D, 0x4A), tolerance=10) > 0.002
