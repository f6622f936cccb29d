"""macOS idle time from CGEventSourceSecondsSinceLastEventType, via ctypes.

Importable everywhere: the framework is loaded only by `load_quartz()`, which the
factory calls only on macOS. No Accessibility permission is needed for this query
(unlike pynput's event tap).
"""

from __future__ import annotations

import ctypes
import logging
import math
from collections.abc import Callable
from typing import Any

from donor_app.activity.sensor_errors import FailureLog

logger = logging.getLogger(__name__)

_FRAMEWORK = "/System/Library/Frameworks/ApplicationServices.framework/ApplicationServices"
K_CG_EVENT_SOURCE_STATE_HID_SYSTEM_STATE = 1
"""kCGEventSourceStateHIDSystemState: input from the hardware, not synthetic events."""
K_CG_ANY_INPUT_EVENT_TYPE = 0xFFFFFFFF
"""kCGAnyInputEventType (~0): keyboard, mouse and tablet events alike."""


def load_quartz() -> Any:
    """Load ApplicationServices; OSError where it does not exist (any non-macOS)."""
    return ctypes.CDLL(_FRAMEWORK)


def bind_seconds_since_input(quartz: Any) -> Callable[[], float]:
    """Bind CGEventSourceSecondsSinceLastEventType of a loaded library to a query."""
    function = quartz.CGEventSourceSecondsSinceLastEventType
    function.argtypes = [ctypes.c_int32, ctypes.c_uint32]
    function.restype = ctypes.c_double

    def query() -> float:
        return float(function(K_CG_EVENT_SOURCE_STATE_HID_SYSTEM_STATE, K_CG_ANY_INPUT_EVENT_TYPE))

    return query


class MacIdleCounter:
    """Idle counter on an injected query (see `ports.IdleCounter`).

    `query` returns seconds since the last HID event and raises OSError on failure.
    """

    def __init__(self, query: Callable[[], float]) -> None:
        self._query = query
        self._failures = FailureLog(logger, "CGEventSourceSecondsSinceLastEventType")

    @classmethod
    def open(cls) -> MacIdleCounter:
        """Load the framework and bind the query; OSError where it does not exist."""
        return cls(bind_seconds_since_input(load_quartz()))

    def seconds_since_last_input(self) -> float | None:
        """Seconds since the last keyboard or pointer event; None when the call failed."""
        try:
            seconds = self._query()
        except OSError as exc:
            self._failures.failed(exc)
            return None
        if math.isnan(seconds) or seconds < 0:  # not a usable answer
            self._failures.failed(OSError(f"implausible idle time {seconds!r}"))
            return None
        self._failures.succeeded()
        return seconds

    def close(self) -> None:
        """Nothing to release (the framework stays loaded for the process)."""


def seconds_since_last_input() -> float:
    """Seconds since the last input (macOS only; OSError elsewhere)."""
    return bind_seconds_since_input(load_quartz())()
