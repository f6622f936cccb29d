"""Idle time from systemd-logind's IdleHint / IdleSinceHintMonotonic, read with `busctl`.

Dependency-free on purpose: one `busctl get-property` per poll (a few ms) instead of a
D-Bus library. Works where X11 idle cannot: Wayland sessions (the compositor sets the
hint) and a system service with no display (the Manager object aggregates every
session on the machine).

logind only knows what the desktop tells it: while IdleHint is false the owner counts
as active *now*. That is the safe side (guests stay out of the way) but coarse: a
desktop that never sets IdleHint never lends the machine through this counter alone.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from donor_app.activity.sensor_errors import FailureLog

logger = logging.getLogger(__name__)

BUSCTL_TIMEOUT_S = 2.0


@dataclass(frozen=True, slots=True)
class LogindObject:
    """Which logind object to ask: one session, or the Manager (all sessions)."""

    path: str
    interface: str


SESSION = LogindObject("/org/freedesktop/login1/session/auto", "org.freedesktop.login1.Session")
"""The caller's own session (for a process inside the owner's login session)."""

MANAGER = LogindObject("/org/freedesktop/login1", "org.freedesktop.login1.Manager")
"""Every session together: idle only when all are (for a system service)."""


@dataclass(frozen=True, slots=True)
class IdleHint:
    """logind's idle state: whether idle, and since when (CLOCK_MONOTONIC, µs)."""

    idle: bool
    since_monotonic_us: int


def busctl_command(target: LogindObject) -> list[str]:
    """The `busctl` command that prints IdleHint and IdleSinceHintMonotonic, one a line."""
    return [
        "busctl",
        "get-property",
        "org.freedesktop.login1",
        target.path,
        target.interface,
        "IdleHint",
        "IdleSinceHintMonotonic",
    ]


def parse_idle_hint(output: str) -> IdleHint:
    """Parse `busctl get-property` output such as ``"b true\\nt 123456789\\n"``.

    Raises ValueError for anything else (wrong types, missing lines, bad numbers).
    """
    lines = [line.split() for line in output.strip().splitlines()]
    if len(lines) != 2 or any(len(fields) != 2 for fields in lines):
        raise ValueError(f"unexpected busctl output: {output!r}")
    (hint_type, hint), (since_type, since) = lines
    if hint_type != "b" or hint not in ("true", "false"):
        raise ValueError(f"unexpected IdleHint: {' '.join(lines[0])!r}")
    if since_type != "t" or not since.isdigit():
        raise ValueError(f"unexpected IdleSinceHintMonotonic: {' '.join(lines[1])!r}")
    return IdleHint(idle=hint == "true", since_monotonic_us=int(since))


def idle_seconds(hint: IdleHint, now_monotonic_us: int) -> float:
    """Seconds since the last input as far as logind knows: 0 while not idle."""
    if not hint.idle:
        return 0.0
    return max(0, now_monotonic_us - hint.since_monotonic_us) / 1_000_000


def run_busctl(command: Sequence[str]) -> str:
    """Run `busctl` and return its stdout; OSError when it fails or times out."""
    try:
        completed = subprocess.run(  # fixed argv, no shell
            list(command),
            capture_output=True,
            text=True,
            timeout=BUSCTL_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise OSError(f"busctl timed out after {BUSCTL_TIMEOUT_S} s") from exc
    if completed.returncode != 0:
        raise OSError(f"busctl exited {completed.returncode}: {completed.stderr.strip()}")
    return completed.stdout


def _monotonic_us() -> int:
    # time.monotonic_ns() is CLOCK_MONOTONIC on Linux, the clock logind's hint uses.
    return time.monotonic_ns() // 1000


class LogindIdleCounter:
    """Idle counter on logind (see `ports.IdleCounter`), with injectable I/O.

    `run` executes a command and returns its stdout (OSError on failure); `monotonic_us`
    reads CLOCK_MONOTONIC in microseconds. Each poll spawns `busctl` (a few ms).
    """

    def __init__(
        self,
        target: LogindObject = SESSION,
        *,
        run: Callable[[Sequence[str]], str] = run_busctl,
        monotonic_us: Callable[[], int] = _monotonic_us,
    ) -> None:
        self._command = busctl_command(target)
        self._run = run
        self._monotonic_us = monotonic_us
        self._failures = FailureLog(logger, f"logind idle query ({target.path})")

    @staticmethod
    def available() -> bool:
        """Whether `busctl` is on PATH (it says nothing about a running logind)."""
        return shutil.which("busctl") is not None

    def seconds_since_last_input(self) -> float | None:
        """Seconds since logind last saw the owner active; None when it cannot be asked."""
        try:
            hint = parse_idle_hint(self._run(self._command))
        except (OSError, ValueError) as exc:
            self._failures.failed(exc)
            return None
        self._failures.succeeded()
        return idle_seconds(hint, self._monotonic_us())

    def close(self) -> None:
        """Nothing to release (each poll is a separate process)."""


def seconds_since_last_input(target: LogindObject = SESSION) -> float:
    """Seconds since the last input according to logind; OSError/ValueError on failure."""
    return idle_seconds(parse_idle_hint(run_busctl(busctl_command(target))), _monotonic_us())
