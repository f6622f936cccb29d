"""The coordinator's image store: files by sha256 under `root/sha256/<hex>`.

An upload is written to a temporary file, hashed as it arrives, and only renamed into
place when its sha256 and size are what the uploader promised; anything else leaves
nothing behind.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from donor_app.domain.vm import SHA256_PATTERN

CHUNK_BYTES = 1 << 20  # 1 MiB, well under the gRPC message limit
MAX_IMAGE_BYTES = 64 << 30  # 64 GiB: a disk image; catches a runaway upload


class ImageUploadError(ValueError):
    """The upload does not match what it claimed; the text names the field."""


def check_sha256(value: str, field: str = "sha256") -> str:
    if not SHA256_PATTERN.fullmatch(value):
        raise ImageUploadError(f"{field}: {value[:80]!r} is not 64 lowercase hex digits")
    return value


class ImageStore:
    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, sha256: str) -> Path:
        return self.root / "sha256" / check_sha256(sha256)

    def has(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def size(self, sha256: str) -> int:
        return self.path(sha256).stat().st_size

    def upload(self) -> Upload:
        directory = self.root / "sha256"
        directory.mkdir(parents=True, exist_ok=True)
        return Upload(directory)

    def read(self, sha256: str, offset: int = 0) -> Iterator[bytes]:
        """Chunks from `offset`. FileNotFoundError for an unknown image."""
        with self.path(sha256).open("rb") as f:
            f.seek(offset)
            while block := f.read(CHUNK_BYTES):
                yield block


class Upload:
    """One incoming image: `begin`, `write` chunks, `finish` (or `abort`)."""

    def __init__(self, directory: Path) -> None:
        self._directory = directory
        fd, name = tempfile.mkstemp(prefix=".upload-", dir=directory)
        self._file = os.fdopen(fd, "wb")
        self._tmp = Path(name)
        self._digest = hashlib.sha256()
        self._size = 0
        self.expected_sha256 = ""
        self.expected_size = 0

    def begin(self, sha256: str, total_size: int) -> None:
        self.expected_sha256 = check_sha256(sha256)
        if not 0 < total_size <= MAX_IMAGE_BYTES:
            raise ImageUploadError(f"total_size: {total_size} is outside 1–{MAX_IMAGE_BYTES}")
        self.expected_size = total_size

    def write(self, data: bytes) -> None:
        self._size += len(data)
        if self._size > self.expected_size:
            raise ImageUploadError(
                f"data: more than the announced total_size of {self.expected_size} bytes"
            )
        self._digest.update(data)
        self._file.write(data)

    def finish(self) -> int:
        """Verify and move into place; returns the size."""
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
        os.chmod(self._tmp, 0o644)
        os.replace(self._tmp, self._directory / actual)
        return self._size

    def abort(self) -> None:
        if not self._file.closed:
            self._file.close()
        self._tmp.unlink(missing_ok=True)
