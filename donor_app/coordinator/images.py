"""The coordinator's image store: files by sha256 under `root/sha256/<hex>`.

An upload is written to a temporary file in `root/tmp`, hashed as it arrives, and only
renamed into place when its sha256 and size are what the uploader promised; anything
else leaves nothing behind. The fleet keeps checkpoints in a second store: they hold a
guest's memory, so every file here is 0600 in 0700 directories (private_files.py), and a
store left wider by an older version is narrowed when it is opened.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from donor_app.domain.vm import SHA256_PATTERN
from donor_app.private_files import PRIVATE_FILE, narrow_files, private_dir

log = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20  # 1 MiB, well under the gRPC message limit
MAX_IMAGE_BYTES = 64 << 30  # 64 GiB: a disk image; catches a runaway upload
# Partial uploads: in `tmp/` now; older versions kept them in `sha256/` under this prefix.
_PARTIAL_PREFIX = ".upload-"

_T = TypeVar("_T")


class ImageUploadError(ValueError):
    """The upload does not match what it claimed; the text names the field."""


def check_sha256(value: str, field: str = "sha256") -> str:
    if not SHA256_PATTERN.fullmatch(value):
        raise ImageUploadError(f"{field}: {value[:80]!r} is not 64 lowercase hex digits")
    return value


class ImageStore:
    """The files under `root`. Opening the store makes its directories private (or
    narrows them, and every stored file, if an older version left them wider) and
    removes partial uploads a crash left behind: nothing uploads before the store is
    opened, and only one coordinator uses a data directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        private_dir(root)
        stored = private_dir(root / "sha256")
        self.temp_dir = private_dir(root / "tmp")
        for leftover in [*self.temp_dir.iterdir(), *stored.glob(f"{_PARTIAL_PREFIX}*")]:
            leftover.unlink(missing_ok=True)
            log.info("removed %s, a partial upload from before the last stop", leftover)
        narrow_files(stored)

    def path(self, sha256: str) -> Path:
        return self.root / "sha256" / check_sha256(sha256)

    def has(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def size(self, sha256: str) -> int:
        return self.path(sha256).stat().st_size

    def upload(self) -> Upload:
        """A new upload; the caller must `finish` or `abort` it."""
        return Upload(self.temp_dir, self.root / "sha256")

    def read(self, sha256: str, offset: int = 0) -> Iterator[bytes]:
        """Chunks from `offset`. FileNotFoundError for an unknown image."""
        with self.path(sha256).open("rb") as f:
            f.seek(offset)
            while block := f.read(CHUNK_BYTES):
                yield block


class Upload:
    """One incoming file: `begin`, `write` chunks, `finish`; `abort` on every other way
    out (it does nothing once finished).

    `write` and `finish` run on worker threads while `abort` comes from the event loop
    (a refused or cancelled RPC), possibly while one of them is still running. `abort`
    never waits for them: it marks the upload aborted, and whichever runs last removes
    the temporary file. An aborted upload is never renamed into place.
    """

    def __init__(self, temp_dir: Path, directory: Path) -> None:
        self._directory = directory
        fd, name = tempfile.mkstemp(prefix=_PARTIAL_PREFIX, dir=temp_dir)
        if os.name == "posix":
            os.fchmod(fd, PRIVATE_FILE)  # mkstemp's 0600 went through the umask
        self._file = os.fdopen(fd, "wb")
        self._tmp = Path(name)
        self._digest = hashlib.sha256()
        self._size = 0
        self._lock = threading.Lock()
        self._busy = False  # a write or finish is running
        self._aborted = False
        self._finished = False
        self.expected_sha256 = ""
        self.expected_size = 0

    def begin(self, sha256: str, total_size: int) -> None:
        self.expected_sha256 = check_sha256(sha256)
        if not 0 < total_size <= MAX_IMAGE_BYTES:
            raise ImageUploadError(f"total_size: {total_size} is outside 1–{MAX_IMAGE_BYTES}")
        self.expected_size = total_size

    def write(self, data: bytes) -> None:
        self._step(lambda: self._write(data))

    def _write(self, data: bytes) -> None:
        self._size += len(data)
        if self._size > self.expected_size:
            raise ImageUploadError(
                f"data: more than the announced total_size of {self.expected_size} bytes"
            )
        self._digest.update(data)
        self._file.write(data)

    def finish(self) -> int:
        """Verify and move into place; returns the size."""
        return self._step(self._finish)

    def _finish(self) -> int:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        if self._size != self.expected_size:
            raise ImageUploadError(
                f"total_size: announced {self.expected_size} bytes, received {self._size}"
            )
        actual = self._digest.hexdigest()
        if actual != self.expected_sha256:
            raise ImageUploadError(
                f"sha256: the data hashes to {actual}, not {self.expected_sha256}"
            )
        with self._lock:  # an abort that came meanwhile wins: nothing is placed
            if self._aborted:
                raise ImageUploadError("upload: aborted")
            os.replace(self._tmp, self._directory / actual)
            self._finished = True
        return self._size

    def _step(self, action: Callable[[], _T]) -> _T:
        with self._lock:
            if self._aborted or self._finished:
                raise ImageUploadError("upload: aborted" if self._aborted else "upload: finished")
            self._busy = True
        try:
            return action()
        finally:
            with self._lock:
                self._busy = False
                discard = self._aborted and not self._finished
            if discard:  # aborted while this step ran: the abort left the cleaning to us
                self._discard()

    def abort(self) -> None:
        with self._lock:
            if self._finished or self._aborted:
                return
            self._aborted = True
            if self._busy:
                return  # the running step discards the file when it ends
        self._discard()

    def _discard(self) -> None:
        self._file.close()
        self._tmp.unlink(missing_ok=True)
