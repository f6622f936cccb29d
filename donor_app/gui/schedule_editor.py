"""The schedule tab: the weekly grid, the list of windows, and the selected window's
label, days, hours and (optional) own limits."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import time

from PySide6.QtCore import QTime
from PySide6.QtWidgets import (
    QCheckBox,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QListWidget,
    QPushButton,
    QTimeEdit,
    QVBoxLayout,
    QWidget,
)

from donor_app.domain.settings import Caps, DonationWindow, Weekday, Window
from donor_app.gui.caps_editor import CapsEditor
from donor_app.gui.schedule_grid import ScheduleGrid


@dataclass
class _Draft:
    """A window being edited: may be invalid until saved (the domain validates then)."""

    label: str
    days: set[Weekday]
    start: time
    end: time
    caps: Caps | None = None

    def window(self) -> Window:
        return Window(frozenset(self.days), self.start, self.end, self.label)


def _qtime(value: time) -> QTime:
    return QTime(value.hour, value.minute, value.second)


def _time(value: QTime) -> time:
    return time(value.hour(), value.minute(), value.second())


class ScheduleEditor(QWidget):
    """Edits a tuple of `DonationWindow`s; `default_caps` seeds a window's own limits."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self._drafts: list[_Draft] = []
        self._selected: int | None = None
        self._loading = False
        self.default_caps: Caps | None = None
        self.locked_window_caps: dict[str, str] = {}
        """Caps keys ("idle.cpu_percent") the fleet bounds → reason; applied to the
        editor of whichever window is selected."""

        self.grid = ScheduleGrid()
        self.list = QListWidget()
        self.list.setMaximumHeight(90)
        self.add_button = QPushButton("Add window")
        self.remove_button = QPushButton("Remove window")
        self.empty_note = QLabel("No windows: donating is allowed at any time.")

        self.label = QLineEdit()
        self.label.setObjectName("schedule.label")
        self.days = {day: QCheckBox(day.short) for day in Weekday}
        self.start = QTimeEdit()
        self.end = QTimeEdit()
        for edit in (self.start, self.end):
            edit.setDisplayFormat("HH:mm")
        self.own_caps = QCheckBox("Own limits in this window (else the default limits apply)")
        self.caps = CapsEditor()

        days_row = QHBoxLayout()
        for box in self.days.values():
            days_row.addWidget(box)
        self.details = QGroupBox("Selected window")
        form = QFormLayout(self.details)
        form.addRow("Label", self.label)
        form.addRow("Days", days_row)
        form.addRow("From", self.start)
        form.addRow("Until (before From: past midnight)", self.end)
        form.addRow(self.own_caps)
        form.addRow(self.caps)

        buttons = QHBoxLayout()
        buttons.addWidget(self.add_button)
        buttons.addWidget(self.remove_button)
        buttons.addStretch()
        layout = QVBoxLayout(self)
        layout.addWidget(self.grid)
        layout.addWidget(self.empty_note)
        layout.addWidget(self.list)
        layout.addLayout(buttons)
        layout.addWidget(self.details)

        self._connect_signals()
        self._refresh()

    def _connect_signals(self) -> None:
        self.grid.windowClicked.connect(self.select)
        self.grid.windowDrawn.connect(self._add_window)
        self.list.currentRowChanged.connect(lambda row: self.select(row if row >= 0 else None))
        self.add_button.clicked.connect(self._add_default)
        self.remove_button.clicked.connect(self._remove_selected)
        self.label.textEdited.connect(self._edited)
        for box in self.days.values():
            box.toggled.connect(self._edited)
        self.start.timeChanged.connect(self._edited)
        self.end.timeChanged.connect(self._edited)
        self.own_caps.toggled.connect(self._own_caps_toggled)
        for spin in self.caps.fields().values():
            spin.valueChanged.connect(self._edited)  # type: ignore[attr-defined]

    # --- the model ------------------------------------------------------------------

    def set_windows(self, windows: tuple[DonationWindow, ...]) -> None:
        self._drafts = [
            _Draft(e.window.label, set(e.window.days), e.window.start, e.window.end, e.caps)
            for e in windows
        ]
        self._selected = 0 if self._drafts else None
        self._refresh()

    def windows(self) -> tuple[DonationWindow, ...]:
        """The windows shown (unvalidated: the Settings they go into validate them)."""
        return tuple(DonationWindow(d.window(), d.caps) for d in self._drafts)

    # --- selection and edits --------------------------------------------------------

    def select(self, index: int | None) -> None:
        if index is not None and not 0 <= index < len(self._drafts):
            index = None
        if index == self._selected:
            return
        self._selected = index
        self._refresh()

    @property
    def selected(self) -> int | None:
        return self._selected

    def _add_window(self, window: Window) -> None:
        self._drafts.append(_Draft(window.label, set(window.days), window.start, window.end))
        self._selected = len(self._drafts) - 1
        self._refresh()
        self.label.setFocus()

    def _add_default(self) -> None:
        self._add_window(
            Window(frozenset(Weekday) - {Weekday.SAT, Weekday.SUN}, time(18), time(8), "nights")
        )

    def _remove_selected(self) -> None:
        if self._selected is None:
            return
        del self._drafts[self._selected]
        self._selected = min(self._selected, len(self._drafts) - 1) if self._drafts else None
        self._refresh()

    def _own_caps_toggled(self, on: bool) -> None:
        if self._loading or self._selected is None:
            return
        draft = self._drafts[self._selected]
        draft.caps = (draft.caps or self.default_caps or self.caps.caps()) if on else None
        self._refresh()

    def _edited(self) -> None:
        """Copy the editor into the selected draft (ignores the editor being loaded)."""
        if self._loading or self._selected is None:
            return
        draft = self._drafts[self._selected]
        draft.label = self.label.text()
        draft.days = {day for day, box in self.days.items() if box.isChecked()}
        draft.start = _time(self.start.time())
        draft.end = _time(self.end.time())
        if self.own_caps.isChecked():
            draft.caps = self.caps.caps()
        self._refresh_overview()

    # --- showing --------------------------------------------------------------------

    def _refresh(self) -> None:
        self._loading = True
        try:
            self._refresh_overview()
            selected = self._drafts[self._selected] if self._selected is not None else None
            self.details.setEnabled(selected is not None)
            self.remove_button.setEnabled(selected is not None)
            if selected is not None:
                self.label.setText(selected.label)
                for day, box in self.days.items():
                    box.setChecked(day in selected.days)
                self.start.setTime(_qtime(selected.start))
                self.end.setTime(_qtime(selected.end))
                self.own_caps.setChecked(selected.caps is not None)
                self.caps.setEnabled(selected.caps is not None)
                if selected.caps is not None:
                    self.caps.set_caps(selected.caps)
                self.apply_caps_locks()
        finally:
            self._loading = False

    def _refresh_overview(self) -> None:
        self.grid.set_windows([d.window() for d in self._drafts], self._selected)
        self.list.blockSignals(True)
        self.list.clear()
        for draft in self._drafts:
            described = draft.window().describe() if draft.days else "(no days)"
            self.list.addItem(f"{draft.label or 'window'}: {described}")
        self.list.setCurrentRow(-1 if self._selected is None else self._selected)
        self.list.blockSignals(False)
        self.empty_note.setVisible(not self._drafts)

    def apply_caps_locks(self) -> None:
        for key, box in self.caps.fields().items():
            reason = self.locked_window_caps.get(key)
            if reason is not None:
                box.setEnabled(False)
                box.setToolTip(f"Locked: {reason}")
