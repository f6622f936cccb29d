"""A small window standing in for the tray icon when the desktop has no system tray,
so donor-app is never running invisibly."""

from __future__ import annotations

from PySide6.QtCore import Signal
from PySide6.QtGui import QCloseEvent, QIcon
from PySide6.QtWidgets import QHBoxLayout, QLabel, QMenu, QPushButton, QVBoxLayout, QWidget

NO_TRAY_MESSAGE = (
    "No system tray was found on this desktop, so donor_app shows this window instead. "
    "Closing it quits donor_app (the agent keeps running)."
)


class FallbackWindow(QWidget):
    closed = Signal()

    def __init__(self, menu: QMenu, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("donor_app")
        self.icon = QLabel()
        self.summary = QLabel()
        self.summary.setObjectName("summary")
        self.summary.setWordWrap(True)
        self.note = QLabel(NO_TRAY_MESSAGE)
        self.note.setObjectName("no_tray")
        self.note.setWordWrap(True)
        self.menu_button = QPushButton("Menu")
        self.menu_button.setMenu(menu)
        top = QHBoxLayout()
        top.addWidget(self.icon)
        top.addWidget(self.summary, 1)
        layout = QVBoxLayout(self)
        layout.addLayout(top)
        layout.addWidget(self.menu_button)
        layout.addWidget(self.note)
        self.resize(420, 160)

    def show_state(self, icon: QIcon, text: str) -> None:
        self.setWindowIcon(icon)
        self.icon.setPixmap(icon.pixmap(48, 48))
        self.summary.setText(text)

    def closeEvent(self, event: QCloseEvent) -> None:
        super().closeEvent(event)
        self.closed.emit()
