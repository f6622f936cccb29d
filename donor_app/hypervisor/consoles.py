"""Each guest's console file kept under a cap, so that a guest printing without end cannot
fill its donor's disk.

Under libvirtd a guest's serial console goes to its file through virtlogd, which rolls the
file over before it would pass its `max_size` (virtlogd.conf: 2 MiB and 3 older files by
default). An embedded QEMU driver has no virtlogd: QEMU writes the file itself, without
end (and a host's virtlogd may have rollover turned off). So `ConsoleCap` also looks at
every guest's console file every CHECK_S on a thread of its own: a file past the cap is
copied to `console.log.0` (replacing the one before) and emptied. The file is written
in append mode, so the guest's next line goes at the start of the emptied file; what it
printed between the copy and the emptying is lost. A console file so holds at most the
cap plus what the guest prints between two looks: its serial port writes about 400 KB/s
under TCG here, 40 KB in CHECK_S.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
from pathlib import Path

from donor_app.hypervisor.guest_files import GuestFiles

log = logging.getLogger(__name__)

MAX_BYTES = 2 * 1024 * 1024  # as virtlogd's default max_size: under it, virtlogd acts first
MIN_BYTES = 4096
CHECK_S = 0.1
BACKUP_SUFFIX = ".0"  # virtlogd's name for the newest older file
_CHUNK = 1 << 20


def check_max_bytes(max_bytes: int) -> int:
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < MIN_BYTES:
        raise ValueError(f"console_max_bytes: {max_bytes!r} is not a whole number ≥ {MIN_BYTES}")
    return max_bytes


def trim(console: Path, max_bytes: int) -> bool:
    """If the console file has passed `max_bytes`, move its content to the backup file
    and empty it; whether it did. A missing file, or anything but a regular file (never
    followed, never written), is left alone."""
    try:
        fd = os.open(console, os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:  # not there (yet), or a link
        return False
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size <= max_bytes:
            return False
        backup = console.with_name(console.name + BACKUP_SUFFIX)
        partial = console.with_name(console.name + BACKUP_SUFFIX + ".part")
        out = os.open(
            partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
        )
        try:
            offset = 0
            while block := os.pread(fd, _CHUNK, offset):
                os.write(out, block)
                offset += len(block)
        finally:
            os.close(out)
        os.replace(partial, backup)
        os.ftruncate(fd, 0)
    finally:
        os.close(fd)
    return True


class ConsoleCap:
    """Keeps every guest's console file under `max_bytes` (see the module docstring)."""

    def __init__(self, files: GuestFiles, max_bytes: int = MAX_BYTES) -> None:
        self.max_bytes = check_max_bytes(max_bytes)
        self._files = files
        self._told: set[str] = set()  # guests whose trimming was logged (once is enough)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="console-cap", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(CHECK_S):
            for guest in self._files.guests():
                console = self._files.console_path(guest)
                try:
                    if trim(console, self.max_bytes) and guest not in self._told:
                        self._told.add(guest)
                        log.info("console of %s passed %d bytes: trimmed", guest, self.max_bytes)
                except OSError as error:  # the guest's directory went as we looked
                    log.debug("console of %s: %s", guest, error)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
