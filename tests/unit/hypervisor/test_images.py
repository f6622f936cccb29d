"""The content-addressed image cache refuses and removes what does not match its hash."""

from __future__ import annotations

import hashlib
import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from donor_app.hypervisor.errors import ImageError
from donor_app.hypervisor.images import ImageCache


@pytest.fixture
def cache(tmp_path: Path) -> ImageCache:
    return ImageCache(tmp_path / "cache")


def _file(tmp_path: Path, content: bytes) -> Path:
    path = tmp_path / "src"
    path.write_bytes(content)
    return path


@pytest.fixture(params=[0o022, 0o000], ids=["umask-022", "umask-000"])
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_add_stores_by_sha256_readable_by_the_agent_only(tmp_path: Path, umask: int):
    """0600 files; the directories let others through (QEMU, another user under
    qemu:///system, opens a boot file by its path once libvirt has made it QEMU's) but
    not list them."""
    cache = ImageCache(tmp_path / "cache")
    sha = cache.add_file(_file(tmp_path, b"kernel bytes"))
    assert sha == hashlib.sha256(b"kernel bytes").hexdigest()
    stored = cache.path(sha)
    assert stored.read_bytes() == b"kernel bytes"
    assert cache.has(sha)
    assert _mode(stored) == 0o600
    assert (_mode(cache.root), _mode(stored.parent)) == (0o711, 0o711)


def test_an_older_cache_is_narrowed_at_start_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    root = tmp_path / "cache"
    (root / "sha256").mkdir(parents=True)
    (root / "incoming").mkdir()
    stored = root / "sha256" / hashlib.sha256(b"disk").hexdigest()
    stored.write_bytes(b"disk")
    for path in (root, root / "sha256", root / "incoming"):
        path.chmod(0o755)
    stored.chmod(0o644)
    with caplog.at_level(logging.WARNING):
        ImageCache(root)
    assert (_mode(root), _mode(root / "sha256"), _mode(root / "incoming")) == (
        0o711,
        0o711,
        0o700,
    )
    assert _mode(stored) == 0o600
    assert "narrowed" in caplog.text


def test_an_expected_hash_that_does_not_match_is_refused(cache: ImageCache, tmp_path: Path):
    wrong = "f" * 64
    with pytest.raises(ImageError, match=f"{wrong}: content of .* refused"):
        cache.add_file(_file(tmp_path, b"payload"), expected_sha256=wrong)
    assert not cache.has(wrong)
    assert not cache.has(hashlib.sha256(b"payload").hexdigest())
    assert list((cache.root / "sha256").iterdir()) == []  # no temp file left behind


def test_a_missing_image_is_named(cache: ImageCache):
    with pytest.raises(ImageError, match="not in the image cache"):
        cache.path("e" * 64)


def test_a_tampered_image_is_refused_and_removed(cache: ImageCache, tmp_path: Path):
    sha = cache.add_file(_file(tmp_path, b"original"))
    stored = cache.path(sha)
    stored.write_bytes(b"evil!!!!")  # same size; mtime changes
    with pytest.raises(ImageError, match="tampered image removed"):
        cache.path(sha)
    assert not stored.exists()


def test_tampering_that_keeps_size_and_mtime_is_caught_by_a_new_cache(
    cache: ImageCache, tmp_path: Path
):
    sha = cache.add_file(_file(tmp_path, b"original"))
    stored = cache.path(sha)
    stat = stored.stat()
    stored.write_bytes(b"evil!!!!")
    os.utime(stored, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    # A fresh process (a new cache object) verifies every file once before use.
    with pytest.raises(ImageError, match="tampered"):
        ImageCache(cache.root).path(sha)


@pytest.mark.parametrize("bad", ["", "abc", "A" * 64, "../" + "a" * 61])
def test_a_malformed_hash_is_refused(cache: ImageCache, bad: str):
    with pytest.raises(ValueError, match="sha256: "):
        cache.path(bad)
