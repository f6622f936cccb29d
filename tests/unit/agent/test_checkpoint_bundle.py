"""A disk guest's checkpoint bundle: written and read back; anything else refused."""

from __future__ import annotations

import io
import os
import stat
import tarfile
from pathlib import Path

import pytest

from donor_app.agent.link.bundle import BundleError, is_bundle, read_bundle, write_bundle


def _files(tmp_path: Path) -> tuple[Path, Path]:
    state, overlay = tmp_path / "checkpoint.save", tmp_path / "disk.qcow2"
    state.write_bytes(b"LibvirtQemudSave" + bytes(range(256)) * 40)
    overlay.write_bytes(b"QFI\xfb" + b"\x5a" * 100_000)
    return state, overlay


def test_a_bundle_gives_back_the_state_and_the_overlay(tmp_path: Path) -> None:
    state, overlay = _files(tmp_path)
    bundle = tmp_path / "checkpoint.bundle"
    write_bundle(state, overlay, bundle)
    assert is_bundle(bundle)
    assert not is_bundle(state)  # a kernel guest's checkpoint is the save file itself
    got_state, got_overlay = read_bundle(bundle, tmp_path / "out")
    assert got_state.read_bytes() == state.read_bytes()
    assert got_overlay.read_bytes() == overlay.read_bytes()


def _tar(tmp_path: Path, members: list[tarfile.TarInfo], data: bytes = b"x") -> Path:
    path = tmp_path / "forged.tar"
    with tarfile.open(path, "w") as tar:
        for member in members:
            member.size = len(data) if member.isreg() else 0
            tar.addfile(member, io.BytesIO(data) if member.isreg() else None)
    return path


def _member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    return info


@pytest.mark.parametrize(
    ("members", "error"),
    [
        ([_member("../state"), _member("disk.qcow2")], "unexpected member '../state'"),
        ([_member("state"), _member("disk.qcow2", tarfile.SYMTYPE, "/etc/shadow")], "disk.qcow2"),
        ([_member("state"), _member("state")], "unexpected member 'state'"),
        ([_member("state"), _member("notes.txt")], "unexpected member 'notes.txt'"),
        ([_member("state")], "lacks disk.qcow2"),
    ],
    ids=["path", "symlink", "twice", "extra", "missing"],
)
def test_a_forged_bundle_is_refused_by_name(
    tmp_path: Path, members: list[tarfile.TarInfo], error: str
) -> None:
    forged = _tar(tmp_path, members)
    with pytest.raises(BundleError, match=error):
        read_bundle(forged, tmp_path / "out")
    assert not (tmp_path / "etc").exists()


def test_a_truncated_bundle_is_refused(tmp_path: Path) -> None:
    state, overlay = _files(tmp_path)
    bundle = tmp_path / "checkpoint.bundle"
    write_bundle(state, overlay, bundle)
    bundle.write_bytes(bundle.read_bytes()[:5000])
    with pytest.raises(BundleError, match="checkpoint.bundle"):
        read_bundle(bundle, tmp_path / "out")


@pytest.mark.parametrize("umask", [0o022, 0o000], ids=["umask-022", "umask-000"])
def test_a_bundle_and_what_it_unpacks_are_private(tmp_path: Path, umask: int) -> None:
    """Both hold a guest's memory (the state) and its disk writes (the overlay)."""
    state, overlay = _files(tmp_path)
    bundle = tmp_path / "checkpoint.bundle"
    old = os.umask(umask)
    try:
        write_bundle(state, overlay, bundle)
        got_state, got_overlay = read_bundle(bundle, tmp_path / "out")
    finally:
        os.umask(old)
    assert _mode(bundle) == 0o600
    assert (_mode(got_state), _mode(got_overlay)) == (0o600, 0o600)
    assert _mode(tmp_path / "out") == 0o700


def test_a_bundle_replacing_an_older_wider_one_is_private(tmp_path: Path) -> None:
    state, overlay = _files(tmp_path)
    bundle = tmp_path / "checkpoint.bundle"
    bundle.write_bytes(b"left by an older version")
    bundle.chmod(0o644)
    write_bundle(state, overlay, bundle)
    assert _mode(bundle) == 0o600
    assert read_bundle(bundle, tmp_path / "out")[0].read_bytes() == state.read_bytes()


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)
