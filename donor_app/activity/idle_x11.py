"""X11 idle time from the MIT-SCREEN-SAVER extension (XScreenSaverQueryInfo), via ctypes.

The display is opened once and queried cheaply (~20–50 µs measured per query).
The server's idle timer counts input from every client, including XTEST (xdotool), but
under Wayland XWayland only sees X clients' input: the factory does not use this module
in a Wayland session.

Xlib's default reaction to a lost connection (X server restarted, session ended) is to
call exit() — twice over: the process-wide I/O error handler `_XDefaultIOError` exits,
and so does each display's I/O error *exit* handler. Losing the display must not kill
the agent, so (libX11 >= 1.7) this module
- replaces the process-wide handler with one that only logs and returns, leaving the
  decision to each display's exit handler (the default one still exits, so other Xlib
  users in the process behave as before), and refuses to replace a handler someone
  else installed;
- gives its own display an exit handler that returns: the display is marked dead and
  every later request on it fails at once, which the counter turns into a reconnect.
Both callbacks are module-level constants: C keeps pointers to them for the life of the
process, so they must never be garbage-collected.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import threading
from collections.abc import Callable

from donor_app.activity.sensor_errors import FailureLog

logger = logging.getLogger(__name__)


class _XScreenSaverInfo(ctypes.Structure):
    # Mirrors XScreenSaverInfo from <X11/extensions/scrnsaver.h>.
    _fields_ = (
        ("window", ctypes.c_ulong),
        ("state", ctypes.c_int),
        ("kind", ctypes.c_int),
        ("til_or_since", ctypes.c_ulong),
        ("idle", ctypes.c_ulong),  # milliseconds since the last input
        ("event_mask", ctypes.c_ulong),
    )


# int (*XIOErrorHandler)(Display *)
_IO_ERROR_HANDLER = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p)
# void (*XIOErrorExitHandler)(Display *, void *user_data)
_IO_ERROR_EXIT_HANDLER = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p)


def _report_io_error(display: int | None) -> int:
    logger.warning("X connection lost (fatal X I/O error on display 0x%x)", display or 0)
    return 0


def _keep_running(_display: int | None, _user_data: int | None) -> None:
    """Our display's exit handler: return instead of exit(); the display is now dead."""


_REPORT_IO_ERROR = _IO_ERROR_HANDLER(_report_io_error)
_KEEP_RUNNING = _IO_ERROR_EXIT_HANDLER(_keep_running)


def _load(name: str, fallback: str) -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library(name) or fallback)


class XScreenSaverConnection:
    """One X display connection used only for screensaver idle queries.

    Not thread-safe by itself (Xlib without XInitThreads); `X11IdleCounter` serialises
    calls. Raises OSError when the libraries, the display or the extension are missing.
    """

    def __init__(self, display_name: str | None = None) -> None:
        self._x11 = _load("X11", "libX11.so.6")
        self._xss = _load("Xss", "libXss.so.1")
        self._x11.XOpenDisplay.argtypes = [ctypes.c_char_p]
        self._x11.XOpenDisplay.restype = ctypes.c_void_p
        self._x11.XCloseDisplay.argtypes = [ctypes.c_void_p]
        self._x11.XCloseDisplay.restype = ctypes.c_int
        self._x11.XDefaultRootWindow.argtypes = [ctypes.c_void_p]
        self._x11.XDefaultRootWindow.restype = ctypes.c_ulong
        self._xss.XScreenSaverQueryExtension.argtypes = [
            ctypes.c_void_p,
            ctypes.POINTER(ctypes.c_int),
            ctypes.POINTER(ctypes.c_int),
        ]
        self._xss.XScreenSaverQueryExtension.restype = ctypes.c_int
        self._xss.XScreenSaverQueryInfo.argtypes = [
            ctypes.c_void_p,
            ctypes.c_ulong,
            ctypes.POINTER(_XScreenSaverInfo),
        ]
        self._xss.XScreenSaverQueryInfo.restype = ctypes.c_int
        try:
            set_exit_handler = self._x11.XSetIOErrorExitHandler
        except AttributeError as exc:
            raise OSError("libX11 < 1.7: losing the display would exit the process") from exc
        set_exit_handler.argtypes = [ctypes.c_void_p, _IO_ERROR_EXIT_HANDLER, ctypes.c_void_p]
        set_exit_handler.restype = None
        self._install_io_error_reporter()

        name = display_name.encode() if display_name is not None else None
        display = self._x11.XOpenDisplay(name)
        if not display:
            raise OSError(f"cannot open X display {display_name or '(DISPLAY)'}")
        self._display: int | None = display
        set_exit_handler(display, _KEEP_RUNNING, None)
        event_base, error_base = ctypes.c_int(), ctypes.c_int()
        if not self._xss.XScreenSaverQueryExtension(
            display, ctypes.byref(event_base), ctypes.byref(error_base)
        ):
            self.close()
            raise OSError("X server lacks the MIT-SCREEN-SAVER extension")
        self._root = int(self._x11.XDefaultRootWindow(display))
        self._info = _XScreenSaverInfo()

    def idle_milliseconds(self) -> int:
        """Milliseconds since the last input on this display; OSError when it failed."""
        display = self._display
        if display is None:
            raise OSError("X display connection closed")
        # Fails (returns 0) once the connection is lost; the I/O error handlers above
        # made Xlib return instead of exiting.
        if not self._xss.XScreenSaverQueryInfo(display, self._root, ctypes.byref(self._info)):
            raise OSError("XScreenSaverQueryInfo failed (X connection lost?)")
        return int(self._info.idle)

    def close(self) -> None:
        """Close the display connection. Idempotent."""
        display, self._display = self._display, None
        if display is not None:
            self._x11.XCloseDisplay(display)

    def _install_io_error_reporter(self) -> None:
        set_handler = self._x11.XSetIOErrorHandler
        set_handler.argtypes = [ctypes.c_void_p]
        set_handler.restype = ctypes.c_void_p
        ours = ctypes.cast(_REPORT_IO_ERROR, ctypes.c_void_p).value
        default = ctypes.cast(self._x11._XDefaultIOError, ctypes.c_void_p).value
        previous = set_handler(ours)
        if previous not in (None, ours, default):
            set_handler(previous)
            raise OSError("another X I/O error handler is installed; not replacing it")


class X11IdleCounter:
    """Idle counter on an injected X11 query (see `ports.IdleCounter`).

    `query` returns milliseconds since the last input and raises OSError on failure;
    `reconnect` (optional) builds a fresh query after a failure, e.g. after the X server
    restarted. Safe to call from several threads (calls are serialised).
    """

    def __init__(
        self,
        query: Callable[[], int],
        *,
        reconnect: Callable[[], tuple[Callable[[], int], Callable[[], None]]] | None = None,
        close: Callable[[], None] | None = None,
    ) -> None:
        self._query = query
        self._reconnect = reconnect
        self._close = close
        self._lock = threading.Lock()
        self._failures = FailureLog(logger, "X11 idle query")

    @classmethod
    def open(cls, display_name: str | None = None) -> X11IdleCounter:
        """Open the display (`DISPLAY` when None); OSError when X11 idle is unusable."""

        def connect() -> tuple[Callable[[], int], Callable[[], None]]:
            connection = XScreenSaverConnection(display_name)
            return connection.idle_milliseconds, connection.close

        query, close = connect()
        return cls(query, reconnect=connect, close=close)

    def seconds_since_last_input(self) -> float | None:
        """Seconds since the last input on the display, None while it cannot be queried."""
        with self._lock:
            try:
                if self._failures.failing and self._reconnect is not None:
                    self._replace_connection(self._reconnect)
                milliseconds = self._query()
            except OSError as exc:
                self._failures.failed(exc)
                return None
            self._failures.succeeded()
            return milliseconds / 1000.0

    def close(self) -> None:
        """Close the display connection. Idempotent."""
        with self._lock:
            close, self._close = self._close, None
            self._reconnect = None
            if close is not None:
                close()

    def _replace_connection(
        self, connect: Callable[[], tuple[Callable[[], int], Callable[[], None]]]
    ) -> None:
        query, close = connect()  # raises OSError while the display is still gone
        if self._close is not None:
            self._close()
        self._query, self._close = query, close


def seconds_since_last_input() -> float:
    """Seconds since the last input on `DISPLAY`, with a one-off connection.

    For one-off checks only: it opens and closes a display connection per call; pollers
    keep an `X11IdleCounter` open instead. Raises OSError when X11 idle is unusable.
    """
    connection = XScreenSaverConnection()
    try:
        return connection.idle_milliseconds() / 1000.0
    finally:
        connection.close()
