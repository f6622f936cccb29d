"""Null sensors report "unknown" and never fail."""

from __future__ import annotations

from donor_app.activity.null import NullHostSensor, NullIdleCounter, NullInputListener


def test_null_input_listener_never_calls_back() -> None:
    calls: list[None] = []
    listener = NullInputListener()
    listener.start(lambda: calls.append(None))
    listener.stop()
    listener.stop()
    assert listener.last_input() is None
    assert listener.event_count() == 0
    assert calls == []


def test_null_idle_counter_is_unknown() -> None:
    counter = NullIdleCounter()
    assert counter.seconds_since_last_input() is None
    counter.close()


def test_null_host_sensor_knows_only_the_cores() -> None:
    reading = NullHostSensor().read()
    assert reading.owner_cpu_percent == 0.0
    assert reading.total_memory_mib == 0
    assert reading.cpu_count >= 1
    assert reading.on_battery is None
    assert reading.max_temperature_c is None
