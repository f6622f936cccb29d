"""X11IdleCounter over injected queries (the real display is in tests/integration)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from donor_app.activity.idle_x11 import X11IdleCounter


class Connection:
    """A fake display connection: answers from a list, raising OSError for errors."""

    def __init__(self, answers: list[int | OSError]) -> None:
        self.answers = answers
        self.closed = 0

    def query(self) -> int:
        answer = self.answers.pop(0)
        if isinstance(answer, OSError):
            raise answer
        return answer

    def close(self) -> None:
        self.closed += 1


def test_milliseconds_become_seconds() -> None:
    connection = Connection([1500, 0])
    counter = X11IdleCounter(connection.query)

    assert counter.seconds_since_last_input() == 1.5
    assert counter.seconds_since_last_input() == 0.0


def test_failure_answers_none_and_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO")
    connection = Connection([OSError("lost"), OSError("lost"), 20])
    counter = X11IdleCounter(connection.query)

    assert counter.seconds_since_last_input() is None
    assert counter.seconds_since_last_input() is None
    assert counter.seconds_since_last_input() == 0.02
    assert caplog.text.count("X11 idle query failed") == 1
    assert "works again" in caplog.text


def test_reconnects_after_a_failure_and_closes_the_dead_connection() -> None:
    dead = Connection([OSError("X server gone")])
    fresh = Connection([250])
    attempts: list[Connection | OSError] = [OSError("still gone"), fresh]

    def reconnect() -> tuple[Callable[[], int], Callable[[], None]]:
        attempt = attempts.pop(0)
        if isinstance(attempt, OSError):
            raise attempt
        return attempt.query, attempt.close

    counter = X11IdleCounter(dead.query, reconnect=reconnect, close=dead.close)

    assert counter.seconds_since_last_input() is None  # the query fails
    assert counter.seconds_since_last_input() is None  # reconnecting fails
    assert counter.seconds_since_last_input() == 0.25  # reconnected
    assert dead.closed == 1
    counter.close()
    counter.close()
    assert fresh.closed == 1


def test_open_fails_cleanly_without_a_display() -> None:
    with pytest.raises(OSError):
        X11IdleCounter.open(":4242")
