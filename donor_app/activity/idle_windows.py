"""Windows idle time from GetLastInputInfo and GetTickCount, via ctypes.

Importable everywhere (the unit tests run the arithmetic on Linux); the Win32 calls are
bound only inside `_win32_ticks()`, which the factory reaches only on Windows.

Both values are 32-bit millisecond tick counts that wrap every ~49.7 days; the
difference is taken modulo 2**32, which is right for any idle time shorter than that.
GetLastInputInfo is read *before* GetTickCount so the difference is never negative.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

from donor_app.activity.sensor_errors import FailureLog

logger = logging.getLogger(__name__)

_TICK_MODULUS = 1 << 32

TickPair = tuple[int, int]
"""(last input tick, current tick), both in milliseconds as the OS reports them."""


def idle_milliseconds(last_input_tick: int, now_tick: int) -> int:
    """Milliseconds between the two 32-bit ticks, across one wraparound of the counter."""
    return (now_tick - last_input_tick) % _TICK_MODULUS


def _win32_ticks() -> TickPair:
    if sys.platform != "win32":
        raise OSError("GetLastInputInfo exists only on Windows")
    import ctypes  # noqa: PLC0415
    from ctypes import wintypes  # noqa: PLC0415

    class LastInputInfo(ctypes.Structure):
        _fields_ = (("cbSize", wintypes.UINT), ("dwTime", wintypes.DWORD))

    info = LastInputInfo()
    info.cbSize = ctypes.sizeof(LastInputInfo)
    if not ctypes.windll.user32.GetLastInputInfo(ctypes.byref(info)):
        raise ctypes.WinError()
    now = int(ctypes.windll.kernel32.GetTickCount()) & (_TICK_MODULUS - 1)
    return int(info.dwTime), now


class WindowsIdleCounter:
    """Idle counter on an injected tick source (see `ports.IdleCounter`).

    `ticks` returns (last input tick, current tick) and raises OSError on failure.
    """

    def __init__(self, ticks: Callable[[], TickPair] = _win32_ticks) -> None:
        self._ticks = ticks
        self._failures = FailureLog(logger, "GetLastInputInfo")

    def seconds_since_last_input(self) -> float | None:
        """Seconds since the last input in this session; None when the call failed."""
        try:
            last_input, now = self._ticks()
        except OSError as exc:
            self._failures.failed(exc)
            return None
        self._failures.succeeded()
        return idle_milliseconds(last_input, now) / 1000.0

    def close(self) -> None:
        """Nothing to release."""


def seconds_since_last_input() -> float:
    """Seconds since the last input (Windows only; OSError elsewhere or on failure)."""
    return idle_milliseconds(*_win32_ticks()) / 1000.0
