"""donor_app.atomic_file: exact modes, the old content kept on any failure, no
temporary file left behind."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from donor_app.atomic_file import write_atomic

posix_only = pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")


@pytest.fixture
def umask_077() -> Iterator[None]:
    """A strict umask, as a system service has: the mode must still come out exact."""
    old = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_writes_a_new_file_with_the_default_private_mode(tmp_path: Path) -> None:
    file = tmp_path / "secret"
    write_atomic(file, b"key")
    assert file.read_bytes() == b"key"
    if os.name == "posix":
        assert _mode(file) == 0o600
    assert os.listdir(tmp_path) == ["secret"]


@posix_only
@pytest.mark.parametrize("mode", [0o400, 0o600, 0o640, 0o644])
def test_the_mode_is_exact_whatever_the_umask(tmp_path: Path, umask_077: None, mode: int) -> None:
    file = tmp_path / "file"
    write_atomic(file, b"x", mode)
    assert _mode(file) == mode


@posix_only
def test_replacing_sets_the_new_mode_and_content(tmp_path: Path) -> None:
    file = tmp_path / "file"
    file.write_bytes(b"old content, longer than the new")
    file.chmod(0o666)
    write_atomic(file, b"new", 0o600)
    assert file.read_bytes() == b"new"
    assert _mode(file) == 0o600
    assert os.listdir(tmp_path) == ["file"]


@posix_only
def test_the_temporary_file_is_never_wider_than_the_mode(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[int] = []
    real_open, real_fsync = os.open, os.fsync

    def spy_open(name: str, flags: int, mode: int = 0o777) -> int:
        if flags & os.O_CREAT:
            seen.append(mode)
        return real_open(name, flags, mode)

    def spy_fsync(fd: int) -> None:
        if stat.S_ISREG(os.fstat(fd).st_mode):
            seen.append(stat.S_IMODE(os.fstat(fd).st_mode))
        real_fsync(fd)

    monkeypatch.setattr(os, "open", spy_open)
    monkeypatch.setattr(os, "fsync", spy_fsync)
    write_atomic(tmp_path / "key", b"secret", 0o400)
    assert seen and all(mode & ~0o400 == 0 for mode in seen), [oct(m) for m in seen]


@pytest.mark.parametrize("step", ["fsync", "replace"])
def test_a_failure_keeps_the_old_content_and_leaves_no_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, step: str
) -> None:
    file = tmp_path / "settings.toml"
    file.write_bytes(b"old")

    def fail(*_args: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, step, fail)
    with pytest.raises(OSError, match="No space"):
        write_atomic(file, b"new" * 1000)
    monkeypatch.undo()
    assert file.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["settings.toml"]


def test_data_that_cannot_be_written_keeps_the_old_content(tmp_path: Path) -> None:
    file = tmp_path / "ledger.json"
    file.write_bytes(b"{}")
    with pytest.raises(TypeError):
        write_atomic(file, "text, not bytes")  # type: ignore[arg-type]
    assert file.read_bytes() == b"{}"
    assert os.listdir(tmp_path) == ["ledger.json"]


def test_a_missing_directory_is_an_error_and_creates_nothing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        write_atomic(tmp_path / "absent" / "file", b"x")
    assert os.listdir(tmp_path) == []


def test_a_leftover_temporary_name_is_skipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    names = iter(["aaaaaaaa", "aaaaaaaa", "bbbbbbbb"])
    monkeypatch.setattr("donor_app.atomic_file.secrets.token_hex", lambda _n: next(names))
    leftover = tmp_path / ".file.aaaaaaaa.tmp"
    write_atomic(tmp_path / "file", b"first")  # takes the first name, renamed away
    leftover.write_bytes(b"someone else's")
    write_atomic(tmp_path / "file", b"second")
    assert (tmp_path / "file").read_bytes() == b"second"
    assert leftover.read_bytes() == b"someone else's"
