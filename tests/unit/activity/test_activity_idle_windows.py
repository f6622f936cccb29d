"""Windows idle arithmetic with injected ticks, including the 32-bit wraparound."""

from __future__ import annotations

import sys

import pytest

from donor_app.activity import idle_windows
from donor_app.activity.idle_windows import WindowsIdleCounter, idle_milliseconds

WRAP = 1 << 32


def test_plain_difference() -> None:
    assert idle_milliseconds(last_input_tick=1_000, now_tick=4_500) == 3_500
    assert idle_milliseconds(last_input_tick=7, now_tick=7) == 0


def test_difference_across_the_wraparound() -> None:
    # Last input 16 ms before the counter wrapped, now 5 ms after it.
    assert idle_milliseconds(last_input_tick=WRAP - 16, now_tick=5) == 21
    # The longest idle time the 32-bit counter can express.
    assert idle_milliseconds(last_input_tick=1, now_tick=0) == WRAP - 1


def test_counter_converts_to_seconds() -> None:
    counter = WindowsIdleCounter(lambda: (WRAP - 1_000, 2_000))
    assert counter.seconds_since_last_input() == 3.0
    counter.close()


def test_counter_answers_none_when_the_call_fails() -> None:
    def failing() -> tuple[int, int]:
        raise OSError("GetLastInputInfo failed")

    assert WindowsIdleCounter(failing).seconds_since_last_input() is None


@pytest.mark.skipif(sys.platform == "win32", reason="checks the non-Windows guard")
def test_win32_calls_refuse_to_run_elsewhere() -> None:
    with pytest.raises(OSError):
        idle_windows.seconds_since_last_input()
    assert WindowsIdleCounter().seconds_since_last_input() is None
