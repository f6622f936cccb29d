"""One factory per seam: pick the sensor for this platform, or the Null one.

Platform modules are imported inside the factories, and anything that goes wrong while
building a sensor (a missing library, no display, a failing first query) makes the
factory fall back to the next candidate and finally to `null`: nothing raises at import
or from a factory. Each factory logs what it chose and why it skipped the others.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING

from donor_app.activity.merge import merge
from donor_app.activity.null import NullHostSensor, NullIdleCounter, NullInputListener
from donor_app.activity.ports import HostSensor, IdleCounter, InputListener

if TYPE_CHECKING:
    from donor_app.activity.input_pynput import ListenerFactory

__all__ = ["make_host_sensor", "make_idle_counter", "make_input_listener", "merge"]

logger = logging.getLogger(__name__)


def _is_x11_platform(platform: str) -> bool:
    return platform not in ("win32", "darwin", "cygwin")


def _is_wayland(environ: Mapping[str, str]) -> bool:
    return bool(environ.get("WAYLAND_DISPLAY")) or environ.get("XDG_SESSION_TYPE") == "wayland"


def make_input_listener(
    *,
    platform: str | None = None,
    environ: Mapping[str, str] | None = None,
    loader: Callable[[], ListenerFactory] | None = None,
) -> InputListener:
    """The pynput listener where pynput can work here, else the Null listener.

    `loader` replaces `input_pynput.load_pynput` (tests); `platform` and `environ`
    default to `sys.platform` and `os.environ`.
    """
    platform = sys.platform if platform is None else platform
    environ = os.environ if environ is None else environ
    if _is_x11_platform(platform) and not environ.get("DISPLAY"):
        logger.info("input listener: none (no X display; headless or Wayland-only)")
        return NullInputListener()
    from donor_app.activity import input_pynput  # noqa: PLC0415

    try:
        backend = (loader or input_pynput.load_pynput)()
    except Exception as exc:
        # ImportError without a display; Xlib's DisplayConnectionError for a dead one.
        logger.warning("input listener: none (pynput unusable: %s: %s)", type(exc).__name__, exc)
        return NullInputListener()
    if _is_x11_platform(platform) and _is_wayland(environ):
        logger.warning(
            "input listener: pynput through XWayland sees only X clients' input; "
            "the idle counter (logind) covers the rest"
        )
    logger.info("input listener: pynput")
    return input_pynput.PynputInputListener(backend)


def _x11_counter() -> IdleCounter:
    from donor_app.activity.idle_x11 import X11IdleCounter  # noqa: PLC0415

    return X11IdleCounter.open()


def _logind_counter(environ: Mapping[str, str]) -> IdleCounter:
    from donor_app.activity import idle_logind  # noqa: PLC0415

    if not idle_logind.LogindIdleCounter.available():
        raise OSError("busctl not found")
    # Inside a login session ask about that session; a system service has none and asks
    # the Manager, which is idle only when every session is.
    target = idle_logind.SESSION if environ.get("XDG_SESSION_ID") else idle_logind.MANAGER
    return idle_logind.LogindIdleCounter(target)


def _windows_counter() -> IdleCounter:
    from donor_app.activity.idle_windows import WindowsIdleCounter  # noqa: PLC0415

    return WindowsIdleCounter()


def _macos_counter() -> IdleCounter:
    from donor_app.activity.idle_macos import MacIdleCounter  # noqa: PLC0415

    return MacIdleCounter.open()


def _idle_candidates(
    platform: str, environ: Mapping[str, str]
) -> list[tuple[str, Callable[[], IdleCounter]]]:
    if platform == "win32":
        return [("GetLastInputInfo", _windows_counter)]
    if platform == "darwin":
        return [("CGEventSource", _macos_counter)]
    candidates: list[tuple[str, Callable[[], IdleCounter]]] = []
    # Under Wayland, XWayland's screensaver timer misses native Wayland input and would
    # call a busy owner idle: only logind's hint (set by the compositor) is trusted.
    if environ.get("DISPLAY") and not _is_wayland(environ):
        candidates.append(("X11 screensaver", _x11_counter))
    candidates.append(("logind", lambda: _logind_counter(environ)))
    return candidates


def make_idle_counter(
    *,
    platform: str | None = None,
    environ: Mapping[str, str] | None = None,
    candidates: list[tuple[str, Callable[[], IdleCounter]]] | None = None,
) -> IdleCounter:
    """The first native idle counter that answers a probe query, else the Null one.

    Linux/BSD: X11 screensaver (not in a Wayland session), then logind. Windows:
    GetLastInputInfo. macOS: CGEventSource. `candidates` (name, builder) replaces that
    list (tests).
    """
    platform = sys.platform if platform is None else platform
    environ = os.environ if environ is None else environ
    if candidates is None:
        candidates = _idle_candidates(platform, environ)
    for name, build in candidates:
        try:
            counter = build()
        except Exception as exc:
            logger.info("idle counter %s unavailable: %s: %s", name, type(exc).__name__, exc)
            continue
        if counter.seconds_since_last_input() is None:
            logger.info("idle counter %s unavailable: its first query failed", name)
            counter.close()
            continue
        logger.info("idle counter: %s", name)
        return counter
    logger.warning("idle counter: none (no native idle source on this system)")
    return NullIdleCounter()


def make_host_sensor(guest_pids: Callable[[], Iterable[int]]) -> HostSensor:
    """The psutil host sensor, else the Null one.

    `guest_pids` returns the guests' QEMU PIDs; it is called on the reading thread.
    """
    try:
        from donor_app.activity.host import PsutilHostSensor  # noqa: PLC0415

        sensor = PsutilHostSensor(guest_pids)
    except Exception as exc:
        logger.warning("host sensor: none (psutil unusable: %s: %s)", type(exc).__name__, exc)
        return NullHostSensor()
    logger.info("host sensor: psutil")
    return sensor
