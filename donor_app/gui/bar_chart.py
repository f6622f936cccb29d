"""A bar chart drawn with QPainter (no plotting dependency): one series, a y scale
from zero to a round maximum, a few x labels."""

from __future__ import annotations

import math
from collections.abc import Sequence

from PySide6.QtCore import QRectF, QSize, Qt
from PySide6.QtGui import QColor, QPainter, QPaintEvent, QPalette
from PySide6.QtWidgets import QSizePolicy, QWidget

_MARGIN_LEFT, _MARGIN_BOTTOM, _MARGIN_TOP = 56, 18, 18


def nice_maximum(value: float) -> float:
    """The smallest of 1, 2, 2.5, 5 × 10ⁿ at or above `value` (1 for nothing)."""
    if value <= 0 or not math.isfinite(value):
        return 1.0
    power = 10.0 ** math.floor(math.log10(value))
    for step in (1, 2, 2.5, 5, 10):
        if value <= step * power:
            return float(step * power)
    return float(10 * power)


class BarChart(QWidget):
    def __init__(self, title: str, unit: str, colour: str, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self._title = title
        self._unit = unit
        self._colour = QColor(colour)
        self._values: list[float] = []
        self._labels: list[tuple[int, str]] = []
        self._empty_text = "No data yet"
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Expanding)

    def sizeHint(self) -> QSize:
        return QSize(520, 170)

    def set_data(
        self, values: Sequence[float], labels: Sequence[tuple[int, str]], empty_text: str = ""
    ) -> None:
        self._values = list(values)
        self._labels = list(labels)
        self._empty_text = empty_text or "No data yet"
        self.update()

    @property
    def values(self) -> list[float]:
        return list(self._values)

    def paintEvent(self, event: QPaintEvent) -> None:
        painter = QPainter(self)
        painter.setRenderHint(QPainter.RenderHint.Antialiasing)
        palette = self.palette()
        text = palette.color(QPalette.ColorRole.WindowText)
        grid = QColor(text)
        grid.setAlpha(60)
        plot = QRectF(
            _MARGIN_LEFT,
            _MARGIN_TOP,
            max(1, self.width() - _MARGIN_LEFT - 8),
            max(1, self.height() - _MARGIN_TOP - _MARGIN_BOTTOM),
        )
        painter.fillRect(plot, palette.color(QPalette.ColorRole.Base))
        painter.setPen(text)
        painter.drawText(
            QRectF(0, 0, self.width(), _MARGIN_TOP), 0, f"{self._title} ({self._unit})"
        )
        top = nice_maximum(max(self._values, default=0.0))
        for fraction in (0.0, 0.5, 1.0):
            y = plot.bottom() - fraction * plot.height()
            painter.setPen(grid)
            painter.drawLine(int(plot.left()), int(y), int(plot.right()), int(y))
            painter.setPen(text)
            painter.drawText(
                QRectF(0, y - 8, _MARGIN_LEFT - 4, 16),
                int(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter),
                f"{top * fraction:.2g}",
            )
        if not self._values or max(self._values) <= 0:
            painter.drawText(plot, int(Qt.AlignmentFlag.AlignCenter), self._empty_text)
        width = plot.width() / max(1, len(self._values))
        gap = 1.0 if width > 3 else 0.0
        for index, value in enumerate(self._values):
            height = plot.height() * min(value, top) / top
            painter.fillRect(
                QRectF(plot.left() + index * width, plot.bottom() - height, width - gap, height),
                self._colour,
            )
        painter.setPen(text)
        metrics = painter.fontMetrics()
        for index, label in self._labels:
            x = plot.left() + index * width
            if x + metrics.horizontalAdvance(label) > self.width():
                continue  # a label that would be cut off says nothing
            painter.drawText(QRectF(x, plot.bottom() + 2, 120, _MARGIN_BOTTOM), 0, label)
        painter.end()
