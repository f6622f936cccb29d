"""A save image from another host, read and rewritten before libvirt reads any of it.

libvirt's QEMU driver writes a save image as a fixed header, then the guest's domain XML
and a "cookie" (both NUL-terminated, in a zero-padded area of `data_len` bytes), then
QEMU's migration stream (src/qemu/qemu_saveimage.h, format version 2). A checkpoint
restored here was written by another donor, who may be hostile, so libvirt must not see
its header or its XML: libvirt would parse that XML as root (and probe the emulator it
names), start a decompressor the header names on the stream, and take the CPU the cookie
names. So the header is read here, with bounds, and rewritten in place with this host's
own definition of the guest and no cookie of the donor's, before libvirt opens the file.
The stream stays as it is: only QEMU reads it, and QEMU refuses a stream that does not
fit the guest the spec builds.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

MAGIC = b"LibvirtQemudSave"
PARTIAL_MAGIC = b"LibvirtQemudPart"  # libvirt's mark of a save that never finished
VERSION = 2
RAW_FORMAT = 0  # the stream as QEMU wrote it (not gzip, bzip2, xz, lzop, zstd or sparse)
# magic, version, data_len, was_running, format, cookieOffset, then 14 unused words; in
# the byte order of the host that wrote it, little-endian on every architecture guests run.
HEADER = struct.Struct("<16s5I56x")
# The area holds a domain XML of a few KiB and libvirt's 64 KiB of padding; a header that
# claims more is not one libvirt wrote.
MAX_DATA_LEN = 16 * 1024 * 1024


class SaveImageError(ValueError):
    """The file is not a save image this host restores; the message says why."""


@dataclass(frozen=True, slots=True)
class SaveImage:
    """A save image's header and the texts in it (`cookie` None when it has none)."""

    data_len: int
    was_running: bool
    xml: str
    cookie: str | None


def _text(data: bytes, what: str) -> str:
    text, nul, _ = data.partition(b"\0")
    if not nul:
        raise SaveImageError(f"{what}: not NUL-terminated")
    try:
        return text.decode("utf-8")
    except UnicodeDecodeError:
        raise SaveImageError(f"{what}: not UTF-8") from None


def read(path: Path) -> SaveImage:
    """The header and texts of the save image at `path` (SaveImageError if it is not one
    this host restores: another format, compressed, unfinished or out of bounds)."""
    with path.open("rb") as f:
        raw = f.read(HEADER.size)
        if len(raw) < HEADER.size:
            raise SaveImageError(f"{len(raw)} bytes: too short for a save image header")
        magic, version, data_len, was_running, fmt, cookie_offset = HEADER.unpack(raw)
        if magic == PARTIAL_MAGIC:
            raise SaveImageError("the save did not finish (its header says so)")
        if magic != MAGIC:
            raise SaveImageError("not a QEMU save image written by libvirt")
        if version != VERSION:
            raise SaveImageError(f"version {version}: only version {VERSION} is restored")
        if fmt != RAW_FORMAT:
            raise SaveImageError(f"format {fmt}: only uncompressed save images are restored")
        if was_running not in (0, 1):
            raise SaveImageError(f"was_running {was_running}: neither 0 nor 1")
        if not 0 < data_len <= MAX_DATA_LEN:
            raise SaveImageError(f"data_len {data_len}: outside 1–{MAX_DATA_LEN} bytes")
        if cookie_offset >= data_len:
            raise SaveImageError(f"cookieOffset {cookie_offset}: past data_len {data_len}")
        data = f.read(data_len)
    if len(data) < data_len:
        raise SaveImageError(f"data_len {data_len}: the file ends after {len(data)} bytes")
    xml_end = cookie_offset or data_len
    cookie = _text(data[xml_end:], "cookie") if cookie_offset else None
    return SaveImage(data_len, bool(was_running), _text(data[:xml_end], "xml"), cookie or None)


def rewrite(path: Path, image: SaveImage, xml: str) -> None:
    """Put `xml` in place of the image's domain XML, with no cookie, keeping its stream
    (where it is: the area keeps its length). SaveImageError if `xml` does not fit."""
    data = xml.encode("utf-8") + b"\0"
    if b"\0" in data[:-1]:
        raise SaveImageError("xml: holds a NUL character")
    if len(data) > image.data_len:
        raise SaveImageError(
            f"xml: {len(data)} bytes do not fit the image's {image.data_len}-byte area"
        )
    header = HEADER.pack(MAGIC, VERSION, image.data_len, int(image.was_running), RAW_FORMAT, 0)
    fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        block = memoryview(header + data.ljust(image.data_len, b"\0"))
        written = 0
        while written < len(block):
            written += os.pwrite(fd, block[written:], written)
        os.fsync(fd)
    finally:
        os.close(fd)
