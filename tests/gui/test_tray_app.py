"""The tray application offscreen (no tray host: the fallback window) against a real
agent: status → icon state and texts, menu actions, losing and regaining the agent,
notices, About, the Activity window."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from datetime import datetime, timedelta

import pytest
from PySide6.QtWidgets import QMessageBox, QSystemTrayIcon
from pytestqt.qtbot import QtBot

from donor_app.domain.decision import Cause
from donor_app.domain.settings import EVERY_DAY, DonationWindow, Window
from donor_app.domain.status import GuestMove
from donor_app.gui.app import TrayApp, TrayOptions
from donor_app.gui.charts_data import Span
from donor_app.gui.fallback_window import NO_TRAY_MESSAGE
from donor_app.gui.presenter import Action, TrayState
from tests.agent_in_process import InProcessAgent
from tests.gui.conftest import MakeAgent, delete_now

DEADLINE_MS = 10_000


@pytest.fixture
def tray(qtbot: QtBot, agent: InProcessAgent) -> Iterator[TrayApp]:
    app = TrayApp(TrayOptions(socket=agent.socket))
    app.start()
    yield app
    app.stop()
    delete_tray(app)


def delete_tray(app: TrayApp) -> None:
    """Its windows, its menu and the app itself, now rather than whenever Python frees
    them (see `delete_now`)."""
    delete_now(app.window, app.settings_dialog, app.activity_window, app.menu, app)


def wait_state(qtbot: QtBot, tray: TrayApp, state: TrayState, ms: int = DEADLINE_MS) -> None:
    qtbot.waitUntil(lambda: tray.state is state, timeout=ms)


def menu_rows(tray: TrayApp) -> dict[str, tuple[str, bool]]:
    """The menu as it is about to show: object name (action) → (text, enabled)."""
    tray.menu.aboutToShow.emit()
    return {
        a.objectName(): (a.text(), a.isEnabled()) for a in tray.menu.actions() if a.objectName()
    }


def test_without_a_tray_host_a_window_says_so(qtbot: QtBot, tray: TrayApp) -> None:
    assert not QSystemTrayIcon.isSystemTrayAvailable()  # offscreen has none
    assert tray.tray is None
    assert tray.window is not None and tray.window.isVisible()
    assert tray.window.note.text() == NO_TRAY_MESSAGE
    wait_state(qtbot, tray, TrayState.DONATING)
    qtbot.waitUntil(
        lambda: "Donating up to 100 % CPU" in tray.window.summary.text(), timeout=DEADLINE_MS
    )
    assert "Lent now: 1 guest" in tray.window.summary.text()


def test_the_menu_follows_the_status_and_pausing_snoozes_the_agent(
    qtbot: QtBot, tray: TrayApp, agent: InProcessAgent
) -> None:
    wait_state(qtbot, tray, TrayState.DONATING)
    rows = menu_rows(tray)
    assert rows["pause_1h"] == ("Pause for &1 hour", True)
    assert rows["resume"][1] is False
    header = tray.menu.actions()[0]
    assert header.text().startswith("Donating up to 100 % CPU") and not header.isEnabled()

    next(a for a in tray.menu.actions() if a.objectName() == "pause_1h").trigger()
    status = agent.client.status()
    assert status.decision.cause is Cause.SNOOZED
    assert status.snoozed_until is not None
    expected = datetime.now().astimezone() + timedelta(hours=1)
    assert abs((status.snoozed_until - expected).total_seconds()) < 5
    assert tray.state is TrayState.SNOOZED  # from the reply, before the next snapshot
    assert menu_rows(tray)["resume"] == ("Res&ume donating", True)

    next(a for a in tray.menu.actions() if a.objectName() == "resume").trigger()
    assert agent.client.status().decision.cause is not Cause.SNOOZED
    wait_state(qtbot, tray, TrayState.DONATING)


def test_the_menu_lists_recent_guest_moves(
    qtbot: QtBot, tray: TrayApp, agent: InProcessAgent
) -> None:
    wait_state(qtbot, tray, TrayState.DONATING)
    moved_at = datetime.now().astimezone()
    move = GuestMove(moved_at, "w-3f2a9c0d11223344", "arrived", "d-91c0aa5500112233", "live")
    agent.engine.set_moves((move,))  # as the agent's move journal does
    qtbot.waitUntil(lambda: bool(tray.status and tray.status.moves), timeout=DEADLINE_MS)
    tray.menu.aboutToShow.emit()
    rows = [a for a in tray.menu.actions() if not a.isSeparator()]
    texts = [a.text() for a in rows]
    assert "Recent moves" in texts
    line = next(a for a in rows if a.text().endswith("w-3f2a… arrived from d-91c0… (live)"))
    assert not line.isEnabled()  # information, not an action


def test_pause_until_i_resume(qtbot: QtBot, tray: TrayApp, agent: InProcessAgent) -> None:
    wait_state(qtbot, tray, TrayState.DONATING)
    tray.run_action(Action.PAUSE_INDEFINITELY)
    assert agent.client.status().snoozed_indefinitely
    assert tray.menu.actions()  # still usable
    assert menu_rows(tray)["resume"][1]


def test_losing_the_agent_shows_disconnected_and_recovers(
    qtbot: QtBot, tray: TrayApp, agent: InProcessAgent
) -> None:
    wait_state(qtbot, tray, TrayState.DONATING)
    agent.stop_api()
    wait_state(qtbot, tray, TrayState.DISCONNECTED)
    rows = menu_rows(tray)
    assert not rows["pause_1h"][1] and not rows["settings"][1]
    assert rows["quit"][1]
    assert tray.window is not None
    assert "Not connected to the donor agent" in tray.window.summary.text()
    agent.start_api()
    wait_state(qtbot, tray, TrayState.DONATING, ms=20_000)  # backoff is at most 10 s
    assert menu_rows(tray)["pause_1h"][1]


def test_a_failing_action_is_shown_not_swallowed(
    qtbot: QtBot, tray: TrayApp, agent: InProcessAgent
) -> None:
    wait_state(qtbot, tray, TrayState.DONATING)
    agent.stop_api()
    tray.run_action(Action.PAUSE_4H)
    assert tray.window is not None
    error = tray.window.findChild(QMessageBox, "error_box")
    assert error is not None and error.isVisible()
    assert error.text().startswith("Pause for 4 hours failed: agent:")


def test_stopping_for_the_schedule_is_announced(
    qtbot: QtBot, tray: TrayApp, agent: InProcessAgent
) -> None:
    wait_state(qtbot, tray, TrayState.DONATING)
    settings, _ = agent.client.settings()
    now = datetime.now().astimezone()
    # A window that is not now: the agent pauses because of the schedule.
    later = (now + timedelta(hours=3)).time().replace(second=0, microsecond=0)
    until = (now + timedelta(hours=4)).time().replace(second=0, microsecond=0)
    window = Window(EVERY_DAY, later, until, "later")
    agent.client.update_settings(replace(settings, schedule=(DonationWindow(window),)))
    wait_state(qtbot, tray, TrayState.PAUSED)
    qtbot.waitUntil(lambda: bool(tray.notices_shown), timeout=DEADLINE_MS)
    title, message = tray.notices_shown[0]
    assert title == "Donating stopped"
    assert message.startswith("Outside donation hours")
    assert tray.window is not None and tray.window.note.text().startswith("Donating stopped:")


def test_owner_activity_is_not_announced(
    qtbot: QtBot, tray: TrayApp, agent: InProcessAgent
) -> None:
    wait_state(qtbot, tray, TrayState.DONATING)
    agent.client.report_activity(datetime.now().astimezone(), 3)
    wait_state(qtbot, tray, TrayState.PAUSED)
    wait_state(qtbot, tray, TrayState.DONATING)  # idle_after = 1 s
    assert tray.notices_shown == []


def test_about_names_the_socket_and_the_agent(
    qtbot: QtBot, tray: TrayApp, agent: InProcessAgent
) -> None:
    wait_state(qtbot, tray, TrayState.DONATING)
    tray.run_action(Action.ABOUT)
    box = tray.window.findChild(QMessageBox, "about_box")  # type: ignore[union-attr]
    assert box is not None
    assert f"Agent socket: {agent.socket}" in box.text()
    assert "Connected to the system's donor agent." in box.text()
    assert "No coordinator configured" in box.text()


def test_settings_open_from_the_menu_and_save_through_the_agent(
    qtbot: QtBot, tray: TrayApp, agent: InProcessAgent
) -> None:
    wait_state(qtbot, tray, TrayState.DONATING)
    tray.run_action(Action.SETTINGS)
    dialog = tray.settings_dialog
    assert dialog is not None and dialog.isVisible()
    dialog.idle_after.setValue(77)
    # Snoozed from the menu while the dialog is open: saving must not undo it.
    tray.run_action(Action.PAUSE_1H)
    dialog.try_save()
    assert not dialog.isVisible()
    saved, _ = agent.client.settings()
    assert saved.idle_after == timedelta(seconds=77)
    assert saved.snooze_until is not None


def test_the_activity_window_shows_the_agents_history(qtbot: QtBot, make_agent: MakeAgent) -> None:
    now = datetime.now().astimezone()
    agent = make_agent(history=[(now - timedelta(hours=2), 3600.0, 2.0), (now, 1800.0, 1.0)])
    tray = TrayApp(TrayOptions(socket=agent.socket))
    tray.start()
    try:
        wait_state(qtbot, tray, TrayState.DONATING)
        tray.run_action(Action.ACTIVITY)
        window = tray.activity_window
        assert window is not None and window.isVisible()
        assert window.span is Span.DAY
        # 1.5 CPU-hours and 3 GiB-hours recorded, plus what the test guest adds (nothing).
        assert "1.50 CPU-hours, 3.00 GiB-hours" in window.totals.text()
        values = window.cpu_chart.values
        assert len(values) in (24, 25) and max(values) == 1.0
        assert values[-1] == 0.5
        window.tabs.setCurrentIndex(0)  # last hour: from this tray's own snapshots
        assert window.span is Span.HOUR
        assert len(window.cpu_chart.values) >= 1
        window.tabs.setCurrentIndex(2)
        assert window.span is Span.WEEK and len(window.cpu_chart.values) >= 168
    finally:
        tray.stop()
        delete_tray(tray)
