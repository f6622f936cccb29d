"""The Activity window: donated CPU and memory over the last hour / day / week, and the
totals (CPU-hours, GiB-hours) from the agent's history.

The day and week charts are the agent's hourly history; the hour chart is per minute,
from the status snapshots this tray has received (the history has no finer grain).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from PySide6.QtCore import QTimer
from PySide6.QtGui import QHideEvent, QShowEvent
from PySide6.QtWidgets import QLabel, QPushButton, QTabBar, QVBoxLayout, QWidget

from donor_app.agent.local_client import AgentUnavailable
from donor_app.domain.history import HourBucket, Totals
from donor_app.gui.bar_chart import BarChart
from donor_app.gui.charts_data import (
    LiveSeries,
    Point,
    Span,
    axis_labels,
    points_from_buckets,
    totals_text,
)

FetchHistory = Callable[[datetime, datetime], tuple[list[HourBucket], Totals]]
REFRESH_MS = 60_000


class ActivityWindow(QWidget):
    def __init__(
        self,
        fetch: FetchHistory,
        live: LiveSeries,
        clock: Callable[[], datetime] = lambda: datetime.now().astimezone(),
        parent: QWidget | None = None,
    ) -> None:
        super().__init__(parent)
        self.setWindowTitle("donor_app — Activity")
        self._fetch = fetch
        self._live = live
        self._clock = clock
        self.span = Span.DAY
        self.tabs = QTabBar()
        for span in Span:
            self.tabs.addTab(span.value)
        self.tabs.setCurrentIndex(list(Span).index(self.span))
        self.tabs.currentChanged.connect(lambda i: self.show_span(list(Span)[i]))
        self.cpu_chart = BarChart("Donated CPU", "cores, average", "#2e9d4a")
        self.memory_chart = BarChart("Donated memory", "GiB, average", "#4a6fa5")
        self.totals = QLabel()
        self.totals.setObjectName("totals")
        self.message = QLabel()
        self.message.setObjectName("message")
        refresh = QPushButton("Refresh")
        refresh.clicked.connect(self.refresh)
        layout = QVBoxLayout(self)
        layout.addWidget(self.tabs)
        layout.addWidget(self.cpu_chart)
        layout.addWidget(self.memory_chart)
        layout.addWidget(self.totals)
        layout.addWidget(self.message)
        layout.addWidget(refresh)
        self.resize(600, 480)
        # Refresh while shown only: a hidden window costs nothing.
        self._timer = QTimer(self)
        self._timer.setInterval(REFRESH_MS)
        self._timer.timeout.connect(self.refresh)

    def showEvent(self, event: QShowEvent) -> None:
        super().showEvent(event)
        self._timer.start()
        self.refresh()

    def hideEvent(self, event: QHideEvent) -> None:
        super().hideEvent(event)
        self._timer.stop()

    def show_span(self, span: Span) -> None:
        self.span = span
        self.refresh()

    def refresh(self) -> None:
        now = self._clock()
        start = now - self.span.length
        try:
            buckets, totals = self._fetch(start, now)
        except AgentUnavailable as exc:
            self.message.setText(f"The agent is not answering: {exc}")
            return
        self.message.setText("")
        since = buckets[0].start if buckets else start
        self.totals.setText(totals_text(totals.cpu_hours, totals.gib_hours, since))
        if self.span is Span.HOUR:
            points = self._live.points(now)
            empty = "Per-minute figures start when the tray starts"
        else:
            points = points_from_buckets(buckets)
            empty = "Nothing donated in this period"
        self._draw(points, empty)

    def _draw(self, points: list[Point], empty: str) -> None:
        labels = axis_labels(points, self.span)
        self.cpu_chart.set_data([p.cores for p in points], labels, empty)
        self.memory_chart.set_data([p.gib for p in points], labels, empty)
