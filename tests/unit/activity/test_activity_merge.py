"""merge(): the newest input of the listener and the idle counter."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from donor_app.activity.merge import merge
from donor_app.activity.null import NullIdleCounter, NullInputListener
from donor_app.activity.ports import OnInput
from donor_app.domain.readings import ActivityReading

NOW = datetime(2026, 3, 2, 14, 0, tzinfo=UTC)


class Listener:
    def __init__(self, last: datetime | None, events: int) -> None:
        self.last, self.events = last, events

    def start(self, on_input: OnInput) -> None:
        pass

    def stop(self) -> None:
        pass

    def last_input(self) -> datetime | None:
        return self.last

    def event_count(self) -> int:
        return self.events


class Idle:
    def __init__(self, seconds: float | None) -> None:
        self.seconds = seconds

    def seconds_since_last_input(self) -> float | None:
        return self.seconds

    def close(self) -> None:
        pass


def test_listener_newer_than_idle_counter() -> None:
    reading = merge(Listener(NOW - timedelta(seconds=2), 7), Idle(30.0), NOW)
    assert reading == ActivityReading(last_input=NOW - timedelta(seconds=2), input_events=7)


def test_idle_counter_newer_than_listener() -> None:
    # e.g. Wayland input the listener cannot see
    reading = merge(Listener(NOW - timedelta(minutes=5), 3), Idle(1.5), NOW)
    assert reading == ActivityReading(last_input=NOW - timedelta(seconds=1.5), input_events=3)


def test_only_one_sensor_knows() -> None:
    assert merge(Listener(None, 0), Idle(10.0), NOW).last_input == NOW - timedelta(seconds=10)
    assert merge(Listener(NOW, 1), Idle(None), NOW).last_input == NOW


def test_neither_knows() -> None:
    assert merge(NullInputListener(), NullIdleCounter(), NOW) == ActivityReading(None, 0)


def test_negative_idle_time_is_now() -> None:
    assert merge(Listener(None, 0), Idle(-0.5), NOW).last_input == NOW
