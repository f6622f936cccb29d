"""The weekly grid: 7 days × 24 hours, windows painted in, drag to add one.

Thin: which cell belongs to which window comes from `schedule_cells` (pure).
"""

from __future__ import annotations

from collections.abc import Sequence

from PySide6.QtCore import QPoint, QRect, QSize, Qt, Signal
from PySide6.QtGui import QColor, QMouseEvent, QPainter, QPaintEvent, QPalette, QPen
from PySide6.QtWidgets import QSizePolicy, QWidget

from donor_app.domain.settings import Weekday, Window
from donor_app.gui.schedule_cells import Cell, cells_of, window_for_cells

# Distinct hues for neighbouring windows; the selected one is drawn with a frame.
_COLOURS = ("#2e9d4a", "#4a6fa5", "#c77d00", "#7b4fc9", "#00838f", "#ad1457")
_LABEL_WIDTH = 40
_HEADER_HEIGHT = 18


class ScheduleGrid(QWidget):
    """Shows `windows`; a click on a window selects it, a drag over free cells asks for
    a new window (`windowDrawn`)."""

    windowClicked = Signal(int)
    windowDrawn = Signal(object)

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self._windows: list[Window] = []
        self._cells: dict[Cell, int] = {}
        self._selected: int | None = None
        self._drag: tuple[Cell, Cell] | None = None
        self.setMinimumSize(QSize(_LABEL_WIDTH + 24 * 14, _HEADER_HEIGHT + 7 * 18))
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
        self.setToolTip("Drag across hours and days to add a donation window")

    def sizeHint(self) -> QSize:
        return QSize(_LABEL_WIDTH + 24 * 20, _HEADER_HEIGHT + 7 * 20)

    def set_windows(self, windows: Sequence[Window], selected: int | None) -> None:
        self._windows = list(windows)
        self._cells = cells_of(self._windows)
        self._selected = selected
        self.update()

    def cell_rect(self, cell: Cell) -> QRect:
        """Where `cell` is drawn (tests click there)."""
        day, hour = cell
        width = (self.width() - _LABEL_WIDTH) / 24
        height = (self.height() - _HEADER_HEIGHT) / 7
        return QRect(
            int(_LABEL_WIDTH + hour * width),
            int(_HEADER_HEIGHT + int(day) * height),
            max(1, int(width) - 1),
            max(1, int(height) - 1),
        )

    def _cell_at(self, point: QPoint) -> Cell | None:
        width = (self.width() - _LABEL_WIDTH) / 24
        height = (self.height() - _HEADER_HEIGHT) / 7
        hour = int((point.x() - _LABEL_WIDTH) // width)
        day = int((point.y() - _HEADER_HEIGHT) // height)
        if 0 <= hour < 24 and 0 <= day < 7:
            return Weekday(day), hour
        return None

    def mousePressEvent(self, event: QMouseEvent) -> None:
        cell = self._cell_at(event.position().toPoint())
        if cell is None or event.button() is not Qt.MouseButton.LeftButton:
            return
        if cell in self._cells:
            self.windowClicked.emit(self._cells[cell])
            return
        self._drag = (cell, cell)
        self.update()

    def mouseMoveEvent(self, event: QMouseEvent) -> None:
        cell = self._cell_at(event.position().toPoint())
        if self._drag is not None and cell is not None:
            self._drag = (self._drag[0], cell)
            self.update()

    def mouseReleaseEvent(self, event: QMouseEvent) -> None:
        if self._drag is None:
            return
        first, last = self._drag
        self._drag = None
        self.update()
        self.windowDrawn.emit(window_for_cells(first, last))

    def paintEvent(self, event: QPaintEvent) -> None:
        painter = QPainter(self)
        try:
            self._paint(painter)
        finally:
            # Even if painting fails: a painter left active on the window's backing store
            # is a crash later.
            painter.end()

    def _paint(self, painter: QPainter) -> None:
        palette = self.palette()
        text = palette.color(QPalette.ColorRole.WindowText)
        empty = palette.color(QPalette.ColorRole.Base)
        for hour in range(0, 24, 3):
            rect = self.cell_rect((Weekday.MON, hour))
            painter.setPen(text)
            painter.drawText(rect.x(), 0, 30, _HEADER_HEIGHT, 0, f"{hour:02d}")
        dragged = self._dragged_cells()
        for day in Weekday:
            row = self.cell_rect((day, 0))
            painter.setPen(text)
            painter.drawText(0, row.y(), _LABEL_WIDTH - 4, row.height(), 0, day.short)
            for hour in range(24):
                cell = (day, hour)
                index = self._cells.get(cell)
                colour = empty if index is None else QColor(_COLOURS[index % len(_COLOURS)])
                if cell in dragged:
                    colour = palette.color(QPalette.ColorRole.Highlight)
                painter.fillRect(self.cell_rect(cell), colour)
                if index is not None and index == self._selected:
                    painter.setPen(QPen(text, 2))
                    painter.drawRect(self.cell_rect(cell).adjusted(1, 1, -1, -1))

    def _dragged_cells(self) -> set[Cell]:
        if self._drag is None:
            return set()
        window = window_for_cells(*self._drag)
        return set(cells_of([window]))
