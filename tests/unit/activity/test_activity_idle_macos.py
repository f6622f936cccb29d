"""macOS idle through the ctypes binding, with a fake framework."""

from __future__ import annotations

import ctypes
import sys

import pytest

from donor_app.activity import idle_macos
from donor_app.activity.idle_macos import (
    K_CG_ANY_INPUT_EVENT_TYPE,
    K_CG_EVENT_SOURCE_STATE_HID_SYSTEM_STATE,
    MacIdleCounter,
    bind_seconds_since_input,
)


class FakeFunction:
    """A ctypes foreign function stand-in: records its signature and calls."""

    def __init__(self, answer: float) -> None:
        self.answer = answer
        self.calls: list[tuple[int, int]] = []
        self.argtypes: list[object] = []
        self.restype: object = None

    def __call__(self, state: int, event_type: int) -> float:
        self.calls.append((state, event_type))
        return self.answer


class FakeQuartz:
    def __init__(self, answer: float) -> None:
        self.CGEventSourceSecondsSinceLastEventType = FakeFunction(answer)


def test_binding_declares_the_c_signature_and_asks_for_any_hid_input() -> None:
    quartz = FakeQuartz(12.5)
    query = bind_seconds_since_input(quartz)
    function = quartz.CGEventSourceSecondsSinceLastEventType

    assert query() == 12.5
    assert function.calls == [(K_CG_EVENT_SOURCE_STATE_HID_SYSTEM_STATE, K_CG_ANY_INPUT_EVENT_TYPE)]
    assert function.argtypes == [ctypes.c_int32, ctypes.c_uint32]
    assert function.restype is ctypes.c_double


def test_counter_through_the_binding() -> None:
    counter = MacIdleCounter(bind_seconds_since_input(FakeQuartz(3.25)))
    assert counter.seconds_since_last_input() == 3.25
    counter.close()


@pytest.mark.parametrize("answer", [float("nan"), -1.0])
def test_implausible_answers_are_none(answer: float) -> None:
    assert (
        MacIdleCounter(bind_seconds_since_input(FakeQuartz(answer))).seconds_since_last_input()
        is None
    )


def test_failing_query_is_none() -> None:
    def failing() -> float:
        raise OSError("no framework")

    assert MacIdleCounter(failing).seconds_since_last_input() is None


@pytest.mark.skipif(sys.platform == "darwin", reason="checks the non-macOS path")
def test_framework_is_absent_elsewhere() -> None:
    with pytest.raises(OSError):
        MacIdleCounter.open()
    with pytest.raises(OSError):
        idle_macos.seconds_since_last_input()
