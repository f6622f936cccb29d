"""A disk overlay from another donor, checked before anything opens a file it names.

A disk guest's checkpoint carries its overlay: a qcow2 file the donor that saved it wrote,
and that donor may be hostile. A qcow2 header can name other files: a backing file (any
path, another image, or a `json:` description of any block device), an external data file
that holds the guest's disk instead of the overlay. Opened on this host, as root by
qemu-img or as the guest's QEMU, those would hand the guest this host's files.

So the header is read here first, by hand and with bounds (`check_header`): only a plain
qcow2 (no encryption, no external data file, no feature this code does not know) whose
one backing file is the guest's base image, by the sha256 it is cached under, passes.
Then `qemu-img info` on the overlay alone (it opens no backing file without
`--backing-chain`) must agree (`check_with_qemu_img`). The overlay's backing file is then
re-pointed at this host's copy of the base image (guest_files.py): its named backing file
is never opened.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import struct
import subprocess
from pathlib import Path, PurePosixPath

QCOW2_MAGIC = b"QFI\xfb"
# The fixed header (big-endian): magic, version, backing_file_offset, backing_file_size,
# cluster_bits, size, crypt_method, l1_size, l1_table_offset, refcount_table_offset,
# refcount_table_clusters, nb_snapshots, snapshots_offset (docs/interop/qcow2.txt).
HEADER_V2 = struct.Struct(">4sIQIIQIIQQIIQ")
# Version 3 adds incompatible, compatible and autoclear features, refcount_order and
# header_length.
HEADER_V3_TAIL = struct.Struct(">QQQII")
# Incompatible feature bits a qcow2 may have: dirty (0), compression type (3), extended
# L2 entries (4). Not corrupt (1), not an external data file (2), nothing unknown.
INCOMPAT_DIRTY, INCOMPAT_CORRUPT, INCOMPAT_DATA_FILE = 1 << 0, 1 << 1, 1 << 2
ALLOWED_INCOMPAT = INCOMPAT_DIRTY | 1 << 3 | 1 << 4
# Header extensions (type, length, data padded to 8 bytes) that matter here.
EXT_END = 0
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_ENCRYPTION = 0x0537BE77
EXT_DATA_FILE = 0x44415441
MAX_BACKING_NAME = 1023  # QEMU's own limit
MAX_HEADER_READ = 2 * 1024 * 1024  # the largest cluster: header and extensions fit in one


class OverlayError(ValueError):
    """The overlay is refused; the message says what it is or names."""


def _read_start(path: Path) -> bytes:
    """The start of the file, which must be a regular file (not a link, not a device)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise OverlayError(f"cannot be opened: {exc.strerror}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OverlayError("not a regular file")
        return os.pread(fd, MAX_HEADER_READ, 0)
    finally:
        os.close(fd)


def _extensions(data: bytes, start: int, cluster_size: int) -> dict[int, bytes]:
    """The header extensions from `start` up to the end marker (within the first cluster)."""
    found: dict[int, bytes] = {}
    offset = start
    limit = min(len(data), cluster_size)
    while True:
        if offset + 8 > limit:
            raise OverlayError("header extensions run past the first cluster")
        kind, length = struct.unpack_from(">II", data, offset)
        if kind == EXT_END:
            return found
        if kind in found:
            raise OverlayError(f"header extension {kind:#x} appears twice")
        end = offset + 8 + length
        if end > limit:
            raise OverlayError(f"header extension {kind:#x} runs past the first cluster")
        found[kind] = data[offset + 8 : end]
        offset = end + (-length % 8)


def check_header(path: Path, base_sha256: str) -> str:
    """Read the overlay's qcow2 header by hand; return its backing file's name.

    Raises OverlayError unless it is a plain qcow2 (version 2 or 3, not encrypted, no
    external data file, no unknown incompatible feature) with exactly one backing file,
    of format qcow2, named after the base image's sha256 (as every donor caches it).
    """
    data = _read_start(path)
    if len(data) < HEADER_V2.size or data[:4] != QCOW2_MAGIC:
        raise OverlayError("not a qcow2 image")
    (
        _,
        version,
        backing_offset,
        backing_size,
        cluster_bits,
        _size,
        crypt_method,
        *_rest,
    ) = HEADER_V2.unpack_from(data)
    if version not in (2, 3):
        raise OverlayError(f"qcow2 version {version}: not 2 or 3")
    if not 9 <= cluster_bits <= 21:
        raise OverlayError(f"cluster_bits {cluster_bits}: outside 9–21")
    if crypt_method != 0:
        raise OverlayError("an encrypted qcow2 image")
    header_length = HEADER_V2.size
    incompatible = 0
    if version == 3:
        if len(data) < HEADER_V2.size + HEADER_V3_TAIL.size:
            raise OverlayError("a qcow2 version 3 header cut short")
        incompatible, _, _, _, header_length = HEADER_V3_TAIL.unpack_from(data, HEADER_V2.size)
        if header_length < HEADER_V2.size + HEADER_V3_TAIL.size or header_length % 8:
            raise OverlayError(f"header_length {header_length}: not a qcow2 version 3 header")
    if incompatible & INCOMPAT_DATA_FILE:
        raise OverlayError("it keeps the guest's disk in an external data file")
    if incompatible & INCOMPAT_CORRUPT:
        raise OverlayError("it is marked corrupt")
    if incompatible & ~ALLOWED_INCOMPAT:
        raise OverlayError(f"unknown incompatible features {incompatible:#x}")
    cluster_size = 1 << cluster_bits
    extensions = _extensions(data, header_length, cluster_size)
    if EXT_DATA_FILE in extensions:
        raise OverlayError("it names an external data file")
    if EXT_ENCRYPTION in extensions:
        raise OverlayError("it carries an encryption header")
    backing_format = extensions.get(EXT_BACKING_FORMAT)
    if backing_format is not None and backing_format != b"qcow2":
        raise OverlayError(
            f"its backing file's format is {backing_format.decode(errors='replace')!r}, not qcow2"
        )
    if backing_offset == 0 or backing_size == 0:
        raise OverlayError("it has no backing file: an overlay is over the base image")
    if backing_size > MAX_BACKING_NAME or backing_offset + backing_size > min(
        len(data), cluster_size
    ):
        raise OverlayError("its backing file's name is out of bounds")
    try:
        backing = data[backing_offset : backing_offset + backing_size].decode("utf-8")
    except UnicodeDecodeError:
        raise OverlayError("its backing file's name is not UTF-8") from None
    if backing.startswith("json:") or PurePosixPath(backing).name != base_sha256:
        shown = backing if len(backing) <= 120 else backing[:117] + "..."
        raise OverlayError(
            f"its backing file {shown!r} is not the base image {base_sha256[:12]}"
            " (a backing chain, another file or a json: description)"
        )
    return backing


def qemu_img_info(path: Path, *, chain: bool = False) -> list[dict[str, object]]:
    """`qemu-img info` of a qcow2 image as JSON: the image alone (opening no file it
    names), or with `chain` its whole backing chain. OverlayError if qemu-img refuses."""
    qemu_img = shutil.which("qemu-img")
    if qemu_img is None:
        raise OverlayError("qemu-img not found (Debian: qemu-utils)")
    command = [qemu_img, "info", "--output=json", "-U", "-f", "qcow2"]
    if chain:
        command.append("--backing-chain")
    result = subprocess.run(
        [*command, str(path)], capture_output=True, text=True, check=False, timeout=60
    )
    if result.returncode != 0:
        raise OverlayError(f"qemu-img info: {result.stderr.strip()}")
    parsed = json.loads(result.stdout)
    return parsed if isinstance(parsed, list) else [parsed]


def _data_file(info: dict[str, object]) -> object:
    specific = info.get("format-specific")
    data = specific.get("data") if isinstance(specific, dict) else None
    return data.get("data-file") if isinstance(data, dict) else None


def check_with_qemu_img(path: Path, backing: str) -> None:
    """qemu-img's own reading of the overlay alone must agree with `check_header`."""
    [info] = qemu_img_info(path)
    if info.get("format") != "qcow2":
        raise OverlayError(f"qemu-img reads it as {info.get('format')!r}, not qcow2")
    if _data_file(info) is not None:
        raise OverlayError("qemu-img finds an external data file in it")
    if info.get("encrypted"):
        raise OverlayError("qemu-img finds it encrypted")
    if info.get("backing-filename") != backing:
        raise OverlayError(f"qemu-img finds the backing file {info.get('backing-filename')!r}")


def check_chain(path: Path, base: Path) -> None:
    """After the re-pointing: the chain QEMU will open is the overlay, then `base`."""
    chain = qemu_img_info(path, chain=True)
    names = [str(info.get("filename")) for info in chain]
    if names != [str(path), str(base)] or _data_file(chain[0]) is not None:
        raise OverlayError(f"its backing chain is {names}, not the overlay over {base}")
