"""FailureLog: one log line per outage."""

from __future__ import annotations

import logging

import pytest

from donor_app.activity.sensor_errors import FailureLog


def test_logs_first_failure_and_recovery_only(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    log = FailureLog(logging.getLogger("test.sensor"), "probe")

    log.succeeded()
    for _ in range(5):
        log.failed(OSError("down"))
    assert log.failing
    log.succeeded()
    log.succeeded()
    log.failed(OSError("down again"))

    messages = [record.getMessage() for record in caplog.records]
    assert messages == [
        "probe failed (logged once until it recovers): down",
        "probe works again",
        "probe failed (logged once until it recovers): down again",
    ]
