"""A disk overlay's qcow2 header, read by hand before anything opens a file it names
(overlays.check_header); headers built here byte by byte, as a hostile donor could.
Real overlays made with qemu-img are refused in tests/integration/test_hostile_checkpoint.py."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest

from donor_app.hypervisor.overlays import OverlayError, check_header

BASE_SHA = "ab" * 32
BACKING = f"/var/cache/donor/images/sha256/{BASE_SHA}"
V2 = struct.Struct(">4sIQIIQIIQQIIQ")
V3_TAIL = struct.Struct(">QQQII")


def _ext(kind: int, data: bytes) -> bytes:
    return struct.pack(">II", kind, len(data)) + data + b"\0" * (-len(data) % 8)


def _qcow2(
    path: Path,
    *,
    backing: str | None = BACKING,
    version: int = 3,
    incompatible: int = 0,
    crypt_method: int = 0,
    extensions: bytes | None = None,
    magic: bytes = b"QFI\xfb",
) -> Path:
    header_length = V2.size + V3_TAIL.size if version == 3 else V2.size
    if extensions is None:
        extensions = _ext(0xE2792ACA, b"qcow2")
    extensions += _ext(0, b"")
    name = backing.encode() if backing is not None else b""
    backing_offset = header_length + len(extensions) if backing is not None else 0
    header = V2.pack(magic, version, backing_offset, len(name), 16, 1 << 26, crypt_method,
                     0, 0, 0, 0, 0, 0)  # fmt: skip
    if version == 3:
        header += V3_TAIL.pack(incompatible, 0, 0, 4, header_length)
    path.write_bytes((header + extensions + name).ljust(1 << 16, b"\0"))
    return path


def test_a_plain_overlay_over_the_base_image_passes(tmp_path: Path):
    assert check_header(_qcow2(tmp_path / "o"), BASE_SHA) == BACKING
    assert check_header(_qcow2(tmp_path / "v2", version=2), BASE_SHA) == BACKING
    # Without the backing format extension (older qemu-img): re-pointed with -F qcow2.
    assert check_header(_qcow2(tmp_path / "nofmt", extensions=b""), BASE_SHA) == BACKING


@pytest.mark.parametrize(
    ("kwargs", "refusal"),
    [
        ({"magic": b"\0\0\0\0"}, "not a qcow2 image"),
        ({"version": 4}, "version 4"),
        ({"crypt_method": 2}, "encrypted"),
        ({"incompatible": 1 << 2}, "external data file"),
        ({"incompatible": 1 << 1}, "corrupt"),
        ({"incompatible": 1 << 9}, "unknown incompatible"),
        ({"extensions": _ext(0x44415441, b"/etc/passwd")}, "external data file"),
        ({"extensions": _ext(0x0537BE77, b"\0" * 16)}, "encryption"),
        ({"extensions": _ext(0xE2792ACA, b"raw")}, "format is 'raw'"),
        ({"extensions": _ext(0xE2792ACA, b"qcow2") * 2}, "appears twice"),
        ({"extensions": struct.pack(">II", 0x1234, 1 << 20)}, "past the first cluster"),
        ({"backing": None}, "no backing file"),
        ({"backing": "/etc/hostname"}, "backing file '/etc/hostname'"),
        ({"backing": f"/elsewhere/middle-of-a-chain-{BASE_SHA}"}, "backing file"),
        ({"backing": f'json:{{"file": {{"filename": "/dev/sda"}}, "x": "/{BASE_SHA}"}}'}, "json:"),
        ({"backing": "x" * 2000}, "out of bounds"),
    ],
)
def test_an_overlay_that_names_other_files_is_refused(
    tmp_path: Path, kwargs: dict[str, object], refusal: str
):
    path = _qcow2(tmp_path / "o", **kwargs)  # type: ignore[arg-type]
    with pytest.raises(OverlayError, match=refusal):
        check_header(path, BASE_SHA)


def test_only_a_regular_file_is_read(tmp_path: Path):
    real = _qcow2(tmp_path / "real")
    link = tmp_path / "link"
    link.symlink_to(real)
    with pytest.raises(OverlayError, match="cannot be opened"):
        check_header(link, BASE_SHA)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(OverlayError, match="not a regular file"):
        check_header(fifo, BASE_SHA)
    short = tmp_path / "short"
    short.write_bytes(b"QFI\xfb")
    with pytest.raises(OverlayError, match="not a qcow2 image"):
        check_header(short, BASE_SHA)
