"""Combine the input listener and the idle counter into one `ActivityReading`."""

from __future__ import annotations

from datetime import datetime, timedelta

from donor_app.activity.ports import IdleCounter, InputListener
from donor_app.domain.readings import ActivityReading


def merge(listener: InputListener, idle: IdleCounter, now: datetime) -> ActivityReading:
    """The newest input either sensor saw, and the listener's event count.

    `now` (timezone-aware) turns the idle counter's "seconds ago" into a time. Either
    sensor may know nothing (None); the reading's `last_input` is None only when both do.
    """
    candidates: list[datetime] = []
    listened = listener.last_input()
    if listened is not None:
        candidates.append(listened)
    idle_seconds = idle.seconds_since_last_input()
    if idle_seconds is not None:
        candidates.append(now - timedelta(seconds=max(0.0, idle_seconds)))
    return ActivityReading(
        last_input=max(candidates, default=None),
        input_events=listener.event_count(),
    )
