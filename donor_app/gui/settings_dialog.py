"""The settings dialog: limits, guards, the weekly schedule, the fleet link.

Save validates through the domain (`Settings` names the bad field) before anything is
sent; then `save` sends the settings to the agent. A refusal or an unreachable agent is
shown in the dialog, which stays open with the owner's edits. Cancel sends nothing.
Fields the fleet policy bounds are disabled, with the administrator's reason.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from datetime import timedelta

from PySide6.QtWidgets import (
    QCheckBox,
    QDialog,
    QDialogButtonBox,
    QDoubleSpinBox,
    QFormLayout,
    QGroupBox,
    QLabel,
    QSpinBox,
    QTabWidget,
    QVBoxLayout,
    QWidget,
)

from donor_app.agent.local_client import AgentRefused, AgentUnavailable
from donor_app.domain.settings import FieldError, Settings
from donor_app.domain.status import AgentStatus
from donor_app.gui.caps_editor import CapsEditor
from donor_app.gui.coordinator_view import coordinator_of
from donor_app.gui.field_names import describe, explain
from donor_app.gui.presenter import coordinator_line
from donor_app.gui.schedule_editor import ScheduleEditor
from donor_app.settings.autostart import Autostart

log = logging.getLogger(__name__)

SaveSettings = Callable[[Settings], object]
"""Sends settings to the agent; raises AgentRefused / AgentUnavailable."""


class SettingsDialog(QDialog):
    def __init__(
        self,
        settings: Settings,
        locked: dict[str, str],
        status: AgentStatus | None,
        save: SaveSettings,
        *,
        autostart: Autostart | None = None,
        autostart_command: Sequence[str] = (),
        parent: QWidget | None = None,
    ) -> None:
        super().__init__(parent)
        self.setWindowTitle("donor_app — Settings")
        self._original = settings
        self._locked = locked
        self._save = save
        self._autostart = autostart
        self._autostart_command = list(autostart_command)
        self.saved: Settings | None = None

        self.tabs = QTabWidget()
        self.tabs.addTab(self._limits_tab(), "Limits")
        self.schedule = ScheduleEditor()
        self.tabs.addTab(self.schedule, "Schedule")
        self.tabs.addTab(self._fleet_tab(status), "Fleet")

        self.error = QLabel()
        self.error.setObjectName("error")
        self.error.setWordWrap(True)
        self.error.setStyleSheet("color: #c62828")
        self.error.hide()
        self.buttons = QDialogButtonBox(
            QDialogButtonBox.StandardButton.Save | QDialogButtonBox.StandardButton.Cancel
        )
        self.buttons.accepted.connect(self.try_save)
        self.buttons.rejected.connect(self.reject)

        layout = QVBoxLayout(self)
        if status is not None and status.settings_error:
            banner = QLabel(
                f"Your settings file has an error, so the last good settings apply:\n"
                f"{status.settings_error}\nSaving here writes a fresh, valid file."
            )
            banner.setObjectName("settings_error")
            banner.setWordWrap(True)
            layout.addWidget(banner)
        layout.addWidget(self.tabs)
        layout.addWidget(self.error)
        layout.addWidget(self.buttons)
        self._load(settings)
        self._apply_locks()

    # --- building -------------------------------------------------------------------

    def _limits_tab(self) -> QWidget:
        tab = QWidget()
        self.enabled = QCheckBox("Donate this computer's idle CPU and memory")
        self.caps = CapsEditor()
        self.idle_after = QSpinBox()
        self.idle_after.setRange(0, 24 * 3600)
        self.idle_after.setSuffix(" s")
        self.pause_on_battery = QCheckBox("Pause while on battery")
        self.pause_on_heat = QCheckBox("Pause when the computer is hotter than")
        self.max_temperature = QDoubleSpinBox()
        self.max_temperature.setRange(-50, 200)
        self.max_temperature.setDecimals(0)
        self.max_temperature.setSuffix(" °C")
        self.start_at_login = QCheckBox("Start donor_app when I log in")
        self.start_at_login.setEnabled(self._autostart is not None)
        self.locks_note = QLabel()
        self.locks_note.setObjectName("locks")
        self.locks_note.setWordWrap(True)

        caps_box = QGroupBox("Default limits (a schedule window may set its own)")
        QVBoxLayout(caps_box).addWidget(self.caps)
        form = QFormLayout()
        form.addRow("Idle after no input for", self.idle_after)
        form.addRow(self.pause_on_battery)
        form.addRow(self.pause_on_heat, self.max_temperature)
        layout = QVBoxLayout(tab)
        layout.addWidget(self.enabled)
        layout.addWidget(caps_box)
        layout.addLayout(form)
        layout.addWidget(self.start_at_login)
        layout.addWidget(self.locks_note)
        layout.addStretch()
        return tab

    def _fleet_tab(self, status: AgentStatus | None) -> QWidget:
        tab = QWidget()
        coordinator = coordinator_of(status) if status is not None else None
        form = QFormLayout(tab)
        if coordinator is None:
            note = "not connected to the agent" if status is None else coordinator_line(None)
            self.coordinator_state = QLabel(note)
            form.addRow("Coordinator", self.coordinator_state)
        else:
            self.coordinator_state = QLabel(coordinator.state.replace("_", " "))
            form.addRow("Coordinator", QLabel(coordinator.address))
            form.addRow("Enrollment", self.coordinator_state)
            form.addRow("Donor id", QLabel(coordinator.donor_id or "—"))
            if coordinator.detail:
                form.addRow("Detail", QLabel(coordinator.detail))
        self.coordinator_state.setObjectName("coordinator_state")
        form.addRow(QLabel("The coordinator is set by your administrator or installer."))
        return tab

    def _load(self, settings: Settings) -> None:
        self.enabled.setChecked(settings.enabled)
        self.caps.set_caps(settings.caps)
        self.schedule.default_caps = settings.caps
        self.schedule.set_windows(settings.schedule)
        self.idle_after.setValue(int(settings.idle_after.total_seconds()))
        self.pause_on_battery.setChecked(settings.pause_on_battery)
        self.pause_on_heat.setChecked(settings.pause_on_heat)
        self.max_temperature.setValue(settings.max_temperature_c)
        if self._autostart is not None:
            self.start_at_login.setChecked(self._autostart.is_enabled())

    # --- locks ----------------------------------------------------------------------

    def fields(self) -> dict[str, QWidget]:
        """The dialog's widgets by settings key (for locks, errors and tests)."""
        fields: dict[str, QWidget] = {
            "enabled": self.enabled,
            "idle_after": self.idle_after,
            "pause_on_battery": self.pause_on_battery,
            "pause_on_heat": self.pause_on_heat,
            "max_temperature_c": self.max_temperature,
            "schedule": self.schedule,
        }
        for key, box in self.caps.fields().items():
            fields[f"caps.{key}"] = box
        return fields

    def _apply_locks(self) -> None:
        fields = self.fields()
        for key, reason in self._locked.items():
            widget = fields.get(key)
            if widget is not None:
                widget.setEnabled(False)
                widget.setToolTip(f"Locked by your administrator: {reason}")
        # A window's own limits are bounded like the default ones.
        self.schedule.locked_window_caps = {
            key.removeprefix("caps."): reason
            for key, reason in self._locked.items()
            if key.startswith("caps.")
        }
        self.schedule.apply_caps_locks()
        if self._locked:
            lines = [
                f"🔒 {describe(key)}: {reason}" for key, reason in sorted(self._locked.items())
            ]
            self.locks_note.setText("Set by your administrator:\n" + "\n".join(lines))
        self.locks_note.setVisible(bool(self._locked))

    # --- saving ---------------------------------------------------------------------

    def edited_settings(self) -> Settings:
        """The settings as edited; raises FieldError naming the first invalid field.

        Built on the settings the dialog opened with, so keys it does not show (e.g.
        evacuate_after, owner_load) are kept as they were.
        """
        return dataclasses.replace(
            self._original,
            enabled=self.enabled.isChecked(),
            caps=self.caps.caps(),
            schedule=self.schedule.windows(),
            idle_after=timedelta(seconds=self.idle_after.value()),
            pause_on_battery=self.pause_on_battery.isChecked(),
            pause_on_heat=self.pause_on_heat.isChecked(),
            max_temperature_c=self.max_temperature.value(),
        )

    def try_save(self) -> None:
        """Validate, send, and close only if the agent took the settings."""
        try:
            settings = self.edited_settings()
        except FieldError as exc:
            self.show_error(str(exc), exc.path)
            return
        try:
            self._save(settings)
        except AgentRefused as exc:
            path = str(exc).partition(": ")[0]
            self.show_error(f"The agent refused the settings — {explain(str(exc))}", path)
            return
        except AgentUnavailable as exc:
            self.show_error(f"The agent is not answering; nothing was saved ({exc}).", "")
            return
        self.saved = settings
        self._apply_autostart()
        self.accept()

    def show_error(self, message: str, path: str) -> None:
        self.error.setText(explain(message) if path and message.startswith(path) else message)
        self.error.show()
        self._focus(path)

    def _focus(self, path: str) -> None:
        if path.startswith("schedule"):
            self.tabs.setCurrentWidget(self.schedule)
            index = path.removeprefix("schedule[").partition("]")[0]
            if index.isdigit():
                self.schedule.select(int(index))
            return
        widget = self.fields().get(path)
        if widget is None and path.startswith("caps."):
            widget = self.caps  # e.g. "caps.idle": neither memory field set
        if widget is not None:
            self.tabs.setCurrentIndex(0)
            widget.setFocus()

    def _apply_autostart(self) -> None:
        if self._autostart is None:
            return
        try:
            if self.start_at_login.isChecked() and not self._autostart.is_enabled():
                self._autostart.enable(self._autostart_command)
            elif not self.start_at_login.isChecked() and self._autostart.is_enabled():
                self._autostart.disable()
        except OSError as exc:
            # The agent has the settings already; the login item is the tray's own.
            log.warning("could not change starting at login: %s", exc)
