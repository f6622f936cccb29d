"""Activity chart numbers (pure)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from donor_app.domain.history import HourBucket
from donor_app.gui.bar_chart import nice_maximum
from donor_app.gui.charts_data import (
    LiveSeries,
    Span,
    axis_labels,
    points_from_buckets,
    totals_text,
)

T0 = datetime(2025, 1, 6, 9, 0, tzinfo=UTC)


def test_hour_buckets_become_average_cores_and_gib() -> None:
    points = points_from_buckets([HourBucket(T0, 1800.0, 2.0), HourBucket(T0, 7200.0, 0.5)])
    assert [(p.cores, p.gib) for p in points] == [(0.5, 2.0), (2.0, 0.5)]


def test_live_series_averages_per_minute_and_forgets_after_an_hour() -> None:
    series = LiveSeries()
    series.add(T0 + timedelta(seconds=5), 100.0, 1024.0)
    series.add(T0 + timedelta(seconds=35), 50.0, 512.0)
    series.add(T0 + timedelta(minutes=1, seconds=1), 200.0, 2048.0)
    points = series.points(T0 + timedelta(minutes=2))
    assert [(p.start, p.cores, p.gib) for p in points] == [
        (T0, 0.75, 0.75),
        (T0 + timedelta(minutes=1), 2.0, 2.0),
    ]
    # An hour later, 60 bars end with the current minute: 09:01 has gone.
    series.add(T0 + timedelta(minutes=60), 0.0, 0.0)
    later = series.points(T0 + timedelta(minutes=60, seconds=30))
    assert [p.start for p in later] == [T0 + timedelta(minutes=1), T0 + timedelta(minutes=60)]
    series.add(T0 + timedelta(minutes=61), 0.0, 0.0)
    latest = series.points(T0 + timedelta(minutes=61))
    assert [p.start for p in latest] == [T0 + timedelta(minutes=60), T0 + timedelta(minutes=61)]


def test_live_series_drops_a_sample_from_before_the_newest_minute() -> None:
    series = LiveSeries()
    series.add(T0 + timedelta(minutes=5), 100.0, 0.0)
    series.add(T0, 400.0, 0.0)  # the clock stepped back
    assert [p.cores for p in series.points(T0 + timedelta(minutes=6))] == [1.0]


def test_axis_labels_spread_over_the_points() -> None:
    points = points_from_buckets([HourBucket(T0 + timedelta(hours=h), 0, 0) for h in range(24)])
    labels = axis_labels(points, Span.DAY)
    assert [i for i, _ in labels] == [0, 6, 12, 18]
    assert axis_labels([], Span.DAY) == []


def test_span_lengths() -> None:
    assert [s.length for s in Span] == [timedelta(hours=1), timedelta(days=1), timedelta(days=7)]


def test_nice_maximum() -> None:
    assert [nice_maximum(v) for v in (0, -1, 0.3, 1, 1.2, 2.2, 4, 7, 730)] == [
        1, 1, 0.5, 1, 2, 2.5, 5, 10, 1000,
    ]  # fmt: skip
    assert nice_maximum(float("nan")) == 1


def test_totals_text_keeps_small_amounts_visible() -> None:
    text = totals_text(0.0042, 0.0, T0)
    assert text.endswith(": 0.0042 CPU-hours, 0.00 GiB-hours of memory")
    assert totals_text(1.5, 3.0, T0).endswith(": 1.50 CPU-hours, 3.00 GiB-hours of memory")
