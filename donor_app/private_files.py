"""Files nobody else may read: directories made with exactly the mode asked (0700 unless
said otherwise) and narrowed when they allow more, files created 0600, whatever the
umask.

For what holds a guest's memory (checkpoints), the fleet's database, and the images
guests boot from. A directory or file left wider by an older version is narrowed at
start, and the log says so. Where the system has no POSIX modes (Windows) these only
create. Standard library only, like atomic_file.py beside it.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path
from typing import BinaryIO

log = logging.getLogger(__name__)

PRIVATE_DIR = 0o700
PRIVATE_FILE = 0o600
_POSIX = os.name == "posix"


def private_dir(directory: Path, mode: int = PRIVATE_DIR) -> Path:
    """`directory`, made with exactly `mode` (and so are its missing parents), or narrowed
    to `mode` if it exists and allows more. Returns it. A parent that exists already is
    left as it is: it may be shared (/var/lib)."""
    missing: list[Path] = []
    probe = directory
    while not probe.exists() and probe != probe.parent:
        missing.append(probe)
        probe = probe.parent
    for path in reversed(missing):
        try:
            path.mkdir(mode)
        except FileExistsError:
            continue  # made meanwhile by another thread: narrowed below if it is ours
        if _POSIX:
            os.chmod(path, mode)  # mkdir's mode went through the umask
    narrow(directory, mode)
    return directory


def narrow(path: Path, mode: int) -> bool:
    """Take away from `path` whatever `mode` does not allow (logged; nothing is added).
    True if its mode changed. A symlink is never followed."""
    if not _POSIX:
        return False
    status = os.lstat(path)
    current = stat.S_IMODE(status.st_mode)
    if stat.S_ISLNK(status.st_mode) or not current & ~mode:
        return False
    os.chmod(path, current & mode)
    log.warning("%s had mode %04o: narrowed to %04o", path, current, current & mode)
    return True


def narrow_files(directory: Path, mode: int = PRIVATE_FILE) -> int:
    """Narrow every regular file directly in `directory` to `mode`; how many changed. One
    log line for the lot (a store may hold thousands)."""
    if not _POSIX or not directory.is_dir():
        return 0
    changed = 0
    for entry in os.scandir(directory):
        if not entry.is_file(follow_symlinks=False):
            continue
        current = stat.S_IMODE(entry.stat(follow_symlinks=False).st_mode)
        if current & ~mode:
            os.chmod(entry.path, current & mode)
            changed += 1
    if changed:
        log.warning("%s: %d files allowed more than %04o: narrowed", directory, changed, mode)
    return changed


def open_private(path: Path) -> BinaryIO:
    """`path` opened for writing, empty, with exactly mode 0600 (even if it existed with
    another mode). Refuses a symlink in its place (OSError)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0)
    flags |= getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
    fd = os.open(path, flags, PRIVATE_FILE)
    try:
        if _POSIX:
            os.fchmod(fd, PRIVATE_FILE)  # the umask may have narrowed it; or it existed
        return os.fdopen(fd, "wb")
    except BaseException:
        os.close(fd)
        raise


def create_private(path: Path) -> bool:
    """Make sure the file `path` exists and is at most 0600 (an existing one is narrowed,
    logged; its content is kept). True if it was created."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    flags |= getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags, PRIVATE_FILE)
    except FileExistsError:
        narrow(path, PRIVATE_FILE)
        return False
    try:
        if _POSIX:
            os.fchmod(fd, PRIVATE_FILE)
    finally:
        os.close(fd)
    return True
