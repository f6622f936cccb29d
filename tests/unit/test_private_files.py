"""donor_app.private_files: exact modes whatever the umask, narrowing that never widens,
parents that exist left alone, and no symlink followed."""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from donor_app.private_files import create_private, narrow, open_private, private_dir

pytestmark = pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")


@pytest.fixture(params=[0o000, 0o022, 0o077], ids=["umask-000", "umask-022", "umask-077"])
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def test_a_new_directory_and_its_missing_parents_get_exactly_the_mode(
    tmp_path: Path, umask: int
) -> None:
    tmp_path.chmod(0o755)
    made = private_dir(tmp_path / "a" / "b", 0o711)
    assert (_mode(tmp_path / "a"), _mode(made)) == (0o711, 0o711)
    assert _mode(tmp_path) == 0o755  # it existed: not ours to change


def test_an_existing_directory_is_narrowed_never_widened(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    wide, narrow_already = tmp_path / "wide", tmp_path / "narrow"
    wide.mkdir(0o777)
    wide.chmod(0o775)
    narrow_already.mkdir()
    narrow_already.chmod(0o500)
    with caplog.at_level(logging.WARNING):
        private_dir(wide)
        private_dir(narrow_already)
    assert (_mode(wide), _mode(narrow_already)) == (0o700, 0o500)
    assert caplog.text.count("narrowed") == 1


def test_narrow_leaves_a_symlink_and_its_target_alone(tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.write_bytes(b"")
    target.chmod(0o644)
    link = tmp_path / "link"
    link.symlink_to(target)
    assert not narrow(link, 0o600)
    assert _mode(target) == 0o644


def test_open_private_makes_an_existing_file_empty_and_0600(tmp_path: Path, umask: int) -> None:
    file = tmp_path / "checkpoint"
    file.write_bytes(b"older and longer")
    file.chmod(0o666)
    with open_private(file) as out:
        out.write(b"new")
    assert (file.read_bytes(), _mode(file)) == (b"new", 0o600)


def test_open_private_refuses_a_symlink(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_bytes(b"not to be touched")
    (tmp_path / "checkpoint").symlink_to(target)
    with pytest.raises(OSError):
        open_private(tmp_path / "checkpoint")
    assert target.read_bytes() == b"not to be touched"


def test_create_private_keeps_the_content_and_narrows(tmp_path: Path, umask: int) -> None:
    new, old = tmp_path / "new.db", tmp_path / "old.db"
    old.write_bytes(b"the fleet")
    old.chmod(0o644)
    assert create_private(new)
    assert not create_private(old)
    assert (_mode(new), new.read_bytes()) == (0o600, b"")
    assert (_mode(old), old.read_bytes()) == (0o600, b"the fleet")
