"""Replacing a file's content atomically: after a crash the file holds the old content or
the new, never a mix, and it is never readable more widely than its mode, even for a moment.

The one writer for the project's small state files (settings, credentials, keys and
certificates, the agent's ledgers, the coordinator's endpoints). Standard library only:
the fleet-config checker carries it to machines where the application is not installed.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

_ATTEMPTS = 100


def write_atomic(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace `path` with `data`; the file ends up with exactly `mode`.

    The data goes to a new temporary file in the same directory (so that the rename is
    atomic), created with `mode` (narrowed by the umask, never wider) and then set to
    exactly `mode`; it is written, flushed and fsync'ed, renamed over `path`, and the
    directory is fsync'ed so that the rename itself survives a power cut. The directory
    must exist. On any failure the temporary file is removed, `path` is left as it was
    and the error (an `OSError` for I/O) propagates.
    """
    fd, temporary = _create_temporary(path, mode)
    try:
        with os.fdopen(fd, "wb") as stream:
            if os.name == "posix":
                # The umask may have narrowed the mode; set it exactly while still empty.
                os.fchmod(stream.fileno(), mode)
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    if os.name == "posix":
        _fsync_directory(path.parent)


def _create_temporary(path: Path, mode: int) -> tuple[int, str]:
    """A new file beside `path` (hidden, named after it), open for writing, and its name."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    flags |= getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
    for _ in range(_ATTEMPTS):
        name = str(path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp"))
        try:
            return os.open(name, flags, mode), name
        except FileExistsError:
            continue  # a leftover or a concurrent writer's: pick another name
    raise FileExistsError(f"{path.parent}: no free name for a temporary copy of {path.name}")


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
