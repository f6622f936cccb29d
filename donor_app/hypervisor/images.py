"""A content-addressed image cache: files are stored and found by their sha256.

A file whose content no longer matches its name is refused and removed, so a guest never
boots from a tampered or truncated image. Hashing a multi-GiB disk at every start would
be slow, so a file verified once is remembered (by size, mtime and inode) for the life of
this object; any change to the file makes it verified again.

Images are the agent's alone: files 0600, whatever the umask. Under qemu:///system QEMU
runs as another user and opens a guest's kernel, initrd or base disk by its path; libvirt
hands each file to that user while a guest uses it (its DAC driver's dynamic_ownership,
on by default), but cannot open the directories on the way, so these let others through
(0711) without letting them list the cache. Downloads in progress stay in a 0700
directory of their own.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import threading
from pathlib import Path

import platformdirs

from donor_app.domain.vm import SHA256_PATTERN
from donor_app.hypervisor.errors import ImageError
from donor_app.private_files import PRIVATE_FILE, narrow_files, private_dir

log = logging.getLogger(__name__)
_CHUNK = 1 << 20
# Others may pass through to a file they are given (QEMU), not list or read.
PASS_THROUGH_DIR = 0o711


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's content."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def _stamp(path: Path) -> tuple[int, int, int]:
    st = path.stat()
    return (st.st_size, st.st_mtime_ns, st.st_ino)


class ImageCache:
    """Images under `root/sha256/<hex>` (0600). A cache that exists is narrowed when
    this is made, if an older version left it wider (logged)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._verified: dict[str, tuple[int, int, int]] = {}
        self._lock = threading.Lock()
        if root.is_dir():
            narrow_files(self._store_dir(), PRIVATE_FILE)
            incoming = root / "incoming"
            if incoming.is_dir():
                private_dir(incoming)

    def _store_dir(self) -> Path:
        """`root/sha256`, made (or narrowed) with the directories above it."""
        private_dir(self.root, PASS_THROUGH_DIR)
        return private_dir(self.root / "sha256", PASS_THROUGH_DIR)

    def incoming_dir(self) -> Path:
        """A private directory for downloads on their way into the cache (`add_file`)."""
        private_dir(self.root, PASS_THROUGH_DIR)
        return private_dir(self.root / "incoming")

    @classmethod
    def default(cls) -> ImageCache:
        """The cache in the user's platform cache dir (created on first add)."""
        return cls(platformdirs.user_cache_path("donor-app") / "images")

    def _file(self, sha256: str) -> Path:
        if not SHA256_PATTERN.fullmatch(sha256):
            raise ValueError(f"sha256: {sha256!r} is not 64 lowercase hex digits")
        return self.root / "sha256" / sha256

    def has(self, sha256: str) -> bool:
        return self._file(sha256).exists()

    def add_file(self, source: Path, expected_sha256: str | None = None) -> str:
        """Copy `source` into the cache and return its sha256.

        With `expected_sha256`, a copy whose content differs is refused (ImageError) and
        nothing is left in the cache.
        """
        store = self._store_dir()
        fd, tmp_name = tempfile.mkstemp(prefix=".incoming-", dir=store)
        tmp = Path(tmp_name)
        try:
            if os.name == "posix":
                os.fchmod(fd, PRIVATE_FILE)  # mkstemp's 0600 went through the umask
            with os.fdopen(fd, "wb") as out, source.open("rb") as src:
                shutil.copyfileobj(src, out, _CHUNK)
                out.flush()
                os.fsync(out.fileno())
            actual = sha256_file(tmp)
            if expected_sha256 is not None and actual != expected_sha256:
                raise ImageError(
                    expected_sha256, f"content of {source} has sha256 {actual}: refused"
                )
            final = self._file(actual)
            os.replace(tmp, final)
            with self._lock:
                self._verified[actual] = _stamp(final)
            return actual
        finally:
            tmp.unlink(missing_ok=True)

    def path(self, sha256: str) -> Path:
        """The verified file for `sha256`; ImageError if it is missing or tampered with.

        A tampered file is removed so the next fetch starts clean.
        """
        file = self._file(sha256)
        try:
            stamp = _stamp(file)
        except FileNotFoundError:
            raise ImageError(sha256, f"not in the image cache {self.root}") from None
        with self._lock:
            if self._verified.get(sha256) == stamp:
                return file
        actual = sha256_file(file)
        if actual != sha256:
            file.unlink(missing_ok=True)
            with self._lock:
                self._verified.pop(sha256, None)
            log.warning("removed tampered image %s (content hashes to %s)", sha256, actual)
            raise ImageError(sha256, f"content hashes to {actual}: tampered image removed")
        with self._lock:
            self._verified[sha256] = stamp
        return file

    def remove(self, sha256: str) -> None:
        self._file(sha256).unlink(missing_ok=True)
        with self._lock:
            self._verified.pop(sha256, None)
