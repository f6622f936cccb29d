"""The tray application: wires the status watcher, the presenter and the Qt widgets.

Threads: the status watcher and the activity forwarder run their own threads; snapshots
reach the GUI thread through queued signals. Agent calls made from menu actions (snooze,
settings, history) run on the GUI thread with a short timeout: they are local RPCs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from pathlib import Path

from PySide6.QtCore import QObject, QTimer, Signal
from PySide6.QtGui import QCursor
from PySide6.QtWidgets import QApplication, QMenu, QMessageBox, QSystemTrayIcon

from donor_app.activity.ports import InputListener
from donor_app.agent.local_client import AgentClient, AgentRefused, AgentUnavailable
from donor_app.domain.guest import GuestState
from donor_app.domain.history import HourBucket, Totals
from donor_app.domain.settings import Settings
from donor_app.domain.status import AgentStatus
from donor_app.gui import presenter
from donor_app.gui.activity_forwarder import ActivityForwarder
from donor_app.gui.activity_window import ActivityWindow
from donor_app.gui.agent_launcher import StartedAgent
from donor_app.gui.charts_data import LiveSeries
from donor_app.gui.fallback_window import FallbackWindow
from donor_app.gui.icons import state_icon
from donor_app.gui.notices import RateLimiter, notice_for
from donor_app.gui.presenter import PAUSE_ACTIONS, Action, TrayState
from donor_app.gui.settings_dialog import SettingsDialog
from donor_app.gui.status_watcher import StatusWatcher, agent_client_factory
from donor_app.gui.tray_menu import fill_menu
from donor_app.settings.autostart import Autostart

log = logging.getLogger(__name__)

ACTION_TIMEOUT_S = 3.0
TRAY_RETRY_MS = 2_000
# At most three notices per quarter hour: a flapping battery must not bury the owner.
NOTICE_LIMIT, NOTICE_PER = 3, timedelta(minutes=15)


def local_now() -> datetime:
    return datetime.now().astimezone()


@dataclass
class TrayOptions:
    socket: Path
    started_agent: StartedAgent | None = None
    input_listener: InputListener | None = None
    autostart: Autostart | None = None
    autostart_command: Sequence[str] = field(default_factory=list)
    clock: Callable[[], datetime] = local_now


class TrayApp(QObject):
    """The tray icon (or the fallback window), its menu and its windows."""

    statusArrived = Signal(object)
    connectionLost = Signal(str)

    def __init__(self, options: TrayOptions, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.options = options
        self._clock = options.clock
        self.status: AgentStatus | None = None
        self.failure = ""
        self._lost_detail = "Connecting…"
        self._shown: tuple[TrayState, str] | None = None
        self._limiter = RateLimiter(NOTICE_LIMIT, NOTICE_PER, self._clock)
        self.live = LiveSeries()
        self.menu = QMenu()
        self.menu.aboutToShow.connect(self.rebuild_menu)
        self.tray: QSystemTrayIcon | None = None
        self.window: FallbackWindow | None = None
        self.settings_dialog: SettingsDialog | None = None
        self.activity_window: ActivityWindow | None = None
        self.notices_shown: list[tuple[str, str]] = []
        self.statusArrived.connect(self._on_status)
        self.connectionLost.connect(self._on_lost)
        self._watcher = StatusWatcher(
            agent_client_factory(options.socket),
            on_status=self.statusArrived.emit,
            on_lost=self.connectionLost.emit,
        )
        self._forwarder: ActivityForwarder | None = None
        if options.input_listener is not None:
            self._forwarder = ActivityForwarder(options.input_listener, self._client)
        self._tray_timer = QTimer(self)
        self._tray_timer.setInterval(TRAY_RETRY_MS)
        self._tray_timer.timeout.connect(self._show_tray_if_available)
        self._agent_timer = QTimer(self)
        self._agent_timer.setInterval(1_000)
        self._agent_timer.timeout.connect(self._check_started_agent)

    # --- life cycle -----------------------------------------------------------------

    def start(self) -> None:
        self.rebuild_menu()
        self._apply()
        if QSystemTrayIcon.isSystemTrayAvailable():
            self._show_tray()
        else:
            log.warning("no system tray on this desktop: showing a window instead")
            self._show_window()
            self._tray_timer.start()
        if self.options.started_agent is not None:
            self._agent_timer.start()
        self._watcher.start()
        if self._forwarder is not None:
            self._forwarder.start()

    def stop(self) -> None:
        self._watcher.stop()
        if self._forwarder is not None:
            self._forwarder.stop()
        if self.tray is not None:
            self.tray.hide()

    def quit(self) -> None:
        self.stop()
        QApplication.quit()

    def _show_tray(self) -> None:
        self._tray_timer.stop()
        if self.tray is not None:
            return
        tray = QSystemTrayIcon(state_icon(self.state), self)
        tray.setContextMenu(self.menu)
        tray.activated.connect(self._on_activated)
        self.tray = tray
        self._shown = None
        self._apply()
        tray.show()
        log.info("tray icon shown")

    def _show_tray_if_available(self) -> None:
        if QSystemTrayIcon.isSystemTrayAvailable():
            self._show_tray()

    def _show_window(self) -> None:
        window = FallbackWindow(self.menu)
        window.closed.connect(self._window_closed)
        self.window = window
        self._shown = None
        self._apply()
        window.show()

    def _window_closed(self) -> None:
        if self.tray is None:
            self.quit()  # the window was the only way to see donor-app

    def _on_activated(self, reason: QSystemTrayIcon.ActivationReason) -> None:
        # A left click opens the menu too: on many Linux panels that is what people do.
        if reason is QSystemTrayIcon.ActivationReason.Trigger:
            self.menu.popup(QCursor.pos())

    # --- status ---------------------------------------------------------------------

    @property
    def state(self) -> TrayState:
        return presenter.tray_state(self.status, self.failure)

    def _on_status(self, status: AgentStatus) -> None:
        if self.status is not None and status.at < self.status.at:
            # A snapshot queued before an action's reply (which is newer): showing it
            # would flicker the icon back for a moment.
            return
        previous, self.status = self.status, status
        self.failure = ""
        self._agent_timer.stop()
        running = [g for g in status.guests if g.state == GuestState.RUNNING]
        self.live.add(
            status.at.astimezone(),
            sum(g.cpu_percent for g in running),
            sum(g.memory_mib for g in running),
        )
        notice = notice_for(previous, status)
        if notice is not None and self._limiter.allow():
            self._notify(notice.title, notice.message)
        self._apply()

    def _on_lost(self, reason: str) -> None:
        self.status = None
        self._lost_detail = f"Retrying… ({reason})"
        if self.options.started_agent is not None:
            self._agent_timer.start()
        self._apply()

    def _check_started_agent(self) -> None:
        started = self.options.started_agent
        if started is None or self.status is not None:
            self._agent_timer.stop()
            return
        code = started.exited()
        if code is not None:
            self._agent_timer.stop()
            self.failure = (
                f"The agent donor-app started (pid {started.pid}) exited with code {code}; "
                f"see {started.log_file}:\n{started.log_tail()}"
            )
            log.error("%s", self.failure)
            self._apply()

    def _apply(self) -> None:
        """Show the current state; touches the widgets only when something changed."""
        now = self._clock()
        state = self.state
        detail = self.failure or self._lost_detail
        text = presenter.tooltip(self.status, now, detail)
        if self._shown == (state, text):
            return
        if self._shown is None or self._shown[0] is not state:
            log.info("tray state: %s", state.value)
        self._shown = (state, text)
        if self.tray is not None:
            self.tray.setIcon(state_icon(state))
            self.tray.setToolTip(text)
        if self.window is not None:
            self.window.show_state(state_icon(state), text)

    def _notify(self, title: str, message: str) -> None:
        self.notices_shown.append((title, message))
        log.info("notice: %s: %s", title, message)
        if self.tray is not None and QSystemTrayIcon.supportsMessages():
            self.tray.showMessage(title, message, state_icon(self.state))
        elif self.window is not None:
            self.window.note.setText(f"{title}: {message}")

    # --- the menu -------------------------------------------------------------------

    def rebuild_menu(self) -> None:
        fill_menu(self.menu, presenter.menu_entries(self.status, self._clock()), self.run_action)

    def run_action(self, action: Action) -> None:
        try:
            if action in PAUSE_ACTIONS:
                until = presenter.snooze_until(action, self._clock())
                with self._client() as client:
                    self._on_status(client.snooze(until))
            elif action is Action.RESUME:
                with self._client() as client:
                    self._on_status(client.resume())
            elif action is Action.SETTINGS:
                self.open_settings()
            elif action is Action.ACTIVITY:
                self.open_activity()
            elif action is Action.ABOUT:
                self.show_about()
            elif action is Action.QUIT:
                self.quit()
        except (AgentUnavailable, AgentRefused) as exc:
            log.warning("%s failed: %s", action.value, exc)
            self._error(f"{presenter.action_label(action, self._clock())} failed: {exc}")

    def _client(self) -> AgentClient:
        return AgentClient(self.options.socket, timeout_s=ACTION_TIMEOUT_S)

    def _error(self, message: str) -> None:
        box = QMessageBox(QMessageBox.Icon.Warning, "donor_app", message, parent=self.window)
        box.setObjectName("error_box")
        box.open()

    # --- windows --------------------------------------------------------------------

    def open_settings(self) -> None:
        if self.settings_dialog is not None and self.settings_dialog.isVisible():
            self.settings_dialog.raise_()
            self.settings_dialog.activateWindow()
            return
        with self._client() as client:
            settings, locked = client.settings()
        dialog = SettingsDialog(
            settings,
            locked,
            self.status,
            self.save_settings,
            autostart=self.options.autostart,
            autostart_command=self.options.autostart_command,
            parent=self.window,
        )
        self.settings_dialog = dialog
        dialog.show()

    def save_settings(self, settings: Settings) -> None:
        """Send the dialog's settings; the snooze is the one in force now (the menu may
        have changed it while the dialog was open)."""
        with self._client() as client:
            current, _ = client.settings()
            client.update_settings(replace(settings, snooze_until=current.snooze_until))

    def open_activity(self) -> None:
        if self.activity_window is None:
            self.activity_window = ActivityWindow(self._history, self.live, self._clock)
        self.activity_window.show()
        self.activity_window.raise_()

    def _history(self, start: datetime, end: datetime) -> tuple[list[HourBucket], Totals]:
        with self._client() as client:
            return client.history(start, end)

    def show_about(self) -> None:
        started = self.options.started_agent
        lines = presenter.about_lines(
            self.status, str(self.options.socket), started.pid if started else None
        )
        box = QMessageBox(
            QMessageBox.Icon.Information,
            "About donor_app",
            "donor_app lends this computer's idle CPU and memory to sandboxed guests; "
            "you always come first.\n\n" + "\n".join(lines),
            parent=self.window,
        )
        box.setObjectName("about_box")
        box.open()
