"""One tray per user: an exclusive lock on a file in the user's runtime directory.

The OS drops the lock when the process dies, however it dies, so a crashed tray never
blocks the next one (unlike a pid file). Qt-free.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import IO


class AlreadyRunning(RuntimeError):
    """Another donor-app of this user holds the lock."""


class InstanceLock:
    """Held from `acquire()` until `release()` or process exit."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: IO[bytes] | None = None

    def acquire(self) -> None:
        """Take the lock or raise `AlreadyRunning` (naming the holder's pid if known)."""
        # Not `parents=True`: the runtime dir itself must already exist (platformdirs
        # checks it is private and falls back elsewhere if not); creating it here with
        # default modes would send the next tray to a different lock file.
        self.path.parent.mkdir(exist_ok=True, mode=0o700)
        handle = self.path.open("a+b")
        try:
            _lock(handle)
        except OSError:
            handle.seek(0)
            holder = handle.read().decode(errors="replace").strip()
            handle.close()
            shown = f" (pid {holder})" if holder else ""
            raise AlreadyRunning(f"donor-app is already running for this user{shown}") from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()).encode())
        handle.flush()
        self._file = handle

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing drops the lock
            self._file = None


def _lock(handle: IO[bytes]) -> None:
    if os.name == "nt":
        import msvcrt  # noqa: PLC0415

        handle.seek(0)
        msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)  # type: ignore[attr-defined]
    else:
        import fcntl  # noqa: PLC0415

        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
