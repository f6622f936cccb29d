"""The coordinator's files are its own: images and checkpoints (a checkpoint holds a
guest's memory) and the SQLite store with its -wal and -shm are 0600 in 0700
directories whatever the umask, and an older install's wider modes are narrowed at start.
An upload that does not finish leaves nothing behind, even when it is cancelled while a
worker thread is still writing it."""

from __future__ import annotations

import hashlib
import logging
import os
import stat
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from donor_app.coordinator.images import ImageStore, ImageUploadError
from donor_app.coordinator.store import open_store
from donor_app.coordinator.tokens import new_token


@pytest.fixture(params=[0o022, 0o000], ids=["umask-022", "umask-000"])
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _modes_under(root: Path) -> dict[str, int]:
    """Every directory and file under `root` (itself included) → its mode."""
    found = {".": _mode(root)}
    for path in root.rglob("*"):
        found[str(path.relative_to(root))] = _mode(path)
    return found


def _store(store: ImageStore, data: bytes) -> str:
    sha256 = hashlib.sha256(data).hexdigest()
    upload = store.upload()
    upload.begin(sha256, len(data))
    upload.write(data)
    upload.finish()
    return sha256


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_images_and_checkpoints_are_0600_in_0700_directories(tmp_path: Path, umask: int) -> None:
    images = ImageStore(tmp_path / "images")
    checkpoints = ImageStore(images.root / "checkpoints")  # laid out as the fleet does
    image = _store(images, b"kernel" * 1000)
    checkpoint = _store(checkpoints, b"guest memory" * 1000)
    modes = _modes_under(images.root)
    assert {f"sha256/{image}", f"checkpoints/sha256/{checkpoint}"} <= set(modes)
    wrong = {
        name: f"{mode:04o}"
        for name, mode in modes.items()
        if mode != (0o700 if (images.root / name).is_dir() else 0o600)
    }
    assert wrong == {}


def test_an_upload_in_progress_is_0600_too(tmp_path: Path, umask: int) -> None:
    store = ImageStore(tmp_path / "checkpoints")
    upload = store.upload()
    upload.begin("a" * 64, 100)
    upload.write(b"x" * 50)
    partial = [p for p in store.root.rglob("*") if p.is_file()]
    assert [_mode(p) for p in partial] == [0o600]
    upload.abort()


def test_an_older_install_is_narrowed_at_start_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "images"
    (root / "checkpoints" / "sha256").mkdir(parents=True)
    stored = root / "checkpoints" / "sha256" / ("b" * 64)
    stored.write_bytes(b"guest memory")
    for directory in (root, root / "checkpoints", root / "checkpoints" / "sha256"):
        directory.chmod(0o755)
    stored.chmod(0o644)
    with caplog.at_level(logging.WARNING):
        ImageStore(root)
        ImageStore(root / "checkpoints")
    assert set(_modes_under(root).values()) <= {0o700, 0o600}
    assert _mode(stored) == 0o600
    assert str(root / "checkpoints") in caplog.text
    assert "narrowed" in caplog.text


def test_partial_uploads_left_by_a_crash_are_removed_at_start(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "checkpoints")
    kept = _store(store, b"a finished checkpoint")
    upload = store.upload()
    upload.begin("c" * 64, 100)
    upload.write(b"half")
    # The process dies here; an older version kept its partial uploads beside the
    # finished ones, under a dot-name.
    (store.root / "sha256" / ".upload-old").write_bytes(b"half of another")
    assert len(_files(store.root)) == 3
    ImageStore(store.root)
    assert _files(store.root) == [f"sha256/{kept}"]


@pytest.mark.parametrize("stage", ["before-data", "mid-way", "refused", "after-finish"])
def test_abort_leaves_only_what_finished(tmp_path: Path, stage: str) -> None:
    store = ImageStore(tmp_path / "checkpoints")
    data = b"guest memory" * 100
    sha256 = hashlib.sha256(data).hexdigest()
    upload = store.upload()
    upload.begin(sha256, len(data))
    if stage == "mid-way":
        upload.write(data[:100])
    elif stage == "refused":
        with pytest.raises(ImageUploadError, match="more than the announced"):
            upload.write(data + b"more")
    elif stage == "after-finish":
        upload.write(data)
        upload.finish()
    upload.abort()
    upload.abort()  # twice is harmless
    assert _files(store.root) == ([f"sha256/{sha256}"] if stage == "after-finish" else [])


def test_after_an_abort_nothing_more_is_written_or_kept(tmp_path: Path) -> None:
    """A cancelled RPC aborts on the event loop while a worker thread may still be about
    to write or finish: that thread must not bring the file back."""
    store = ImageStore(tmp_path / "checkpoints")
    data = b"guest memory"
    upload = store.upload()
    upload.begin(hashlib.sha256(data).hexdigest(), len(data))
    upload.abort()
    with pytest.raises(ImageUploadError, match="aborted"):
        upload.write(data)
    with pytest.raises(ImageUploadError, match="aborted"):
        upload.finish()
    assert _files(store.root) == []


def test_an_abort_during_a_write_is_cleaned_up_by_the_writer(tmp_path: Path) -> None:
    """The abort does not wait for the worker thread (it runs on the event loop): the
    thread that was writing removes the file when it is done."""
    store = ImageStore(tmp_path / "checkpoints")
    data = b"m" * 4096
    upload = store.upload()
    upload.begin(hashlib.sha256(data).hexdigest(), len(data))
    writing, release = threading.Event(), threading.Event()

    class SlowChunk(bytes):
        def __len__(self) -> int:  # called by write before the data goes out
            writing.set()
            release.wait(5)
            return super().__len__()

    errors: list[BaseException] = []

    def write() -> None:
        try:
            upload.write(SlowChunk(data))
        except BaseException as error:  # reported by the assertion below
            errors.append(error)

    writer = threading.Thread(target=write)
    writer.start()
    assert writing.wait(5)
    upload.abort()  # returns at once, the write still in progress
    assert writer.is_alive()
    release.set()
    writer.join(5)
    assert errors == []  # the write ran to its end, on a file still open
    assert _files(store.root) == []


def test_the_sqlite_store_and_its_wal_and_shm_are_0600(tmp_path: Path, umask: int) -> None:
    path = tmp_path / "data" / "coordinator.db"
    store = open_store(f"sqlite:///{path}")
    try:
        _text, token = new_token(datetime.now(UTC), timedelta(hours=1), 1, "")
        store.add_token(token)  # a write: the WAL is in use
        names = sorted(p.name for p in path.parent.iterdir())
        assert names == ["coordinator.db", "coordinator.db-shm", "coordinator.db-wal"]
        assert {name: _mode(path.parent / name) for name in names} == dict.fromkeys(names, 0o600)
        assert _mode(path.parent) == 0o700
    finally:
        store.close()


def test_an_older_sqlite_store_is_narrowed_at_start_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "coordinator.db"
    old = os.umask(0o022)
    try:
        open_store(f"sqlite:///{path}").close()
        for file in tmp_path.iterdir():
            file.chmod(0o644)
        (tmp_path / "coordinator.db-wal").write_bytes(b"")  # as if the last stop was abrupt
        (tmp_path / "coordinator.db-wal").chmod(0o644)
        with caplog.at_level(logging.WARNING):
            open_store(f"sqlite:///{path}").close()
    finally:
        os.umask(old)
    assert {p.name: _mode(p) for p in tmp_path.iterdir() if p.is_file()} == {
        p.name: 0o600 for p in tmp_path.iterdir() if p.is_file()
    }
    assert f"{path} had mode 0644" in caplog.text
