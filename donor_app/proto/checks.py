"""Checks on fields coming off the coordinator's wire, shared by its serde modules.

A bad field raises `WireError` whose message starts with the field's path
("hello.capacity.cores: ..."), which the servicer returns as INVALID_ARGUMENT.
"""

from __future__ import annotations

import re
from datetime import datetime

from google.protobuf.timestamp_pb2 import Timestamp

from donor_app.domain.link import MAX_TEXT
from donor_app.proto.serde import moment_from_wire

ID_PATTERN = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")


class WireError(ValueError):
    """A message field is invalid; the text names the field."""


def text(path: str, value: str, limit: int = MAX_TEXT) -> str:
    """`value`, if it is at most `limit` characters (WireError naming `path` if not)."""
    if len(value) > limit:
        raise WireError(f"{path}: longer than {limit} characters")
    return value


def identifier(path: str, value: str) -> str:
    """An id from the wire (WireError naming `path` if it is not one)."""
    if not ID_PATTERN.fullmatch(value):
        raise WireError(
            f"{path}: {value[:80]!r} is not an identifier (1–128 of A–Z a–z 0–9 _ . : -)"
        )
    return value


def time_at(path: str, stamp: Timestamp) -> datetime:
    """A timestamp from the wire as a datetime (WireError naming `path` if it is outside
    protobuf's range, 0001-01-01 to 9999-12-31: a donor's stream must end with
    INVALID_ARGUMENT then, not as if it had simply closed)."""
    try:
        return moment_from_wire(path, stamp)
    except ValueError as error:
        raise WireError(str(error)) from None


def optional_time(path: str, message: object, name: str) -> datetime | None:
    """The timestamp field `name` of `message` (at `path`) as a datetime, None when
    unset; WireError naming `path.name` if it is out of range."""
    if message.HasField(name):  # type: ignore[attr-defined]
        return time_at(f"{path}.{name}", getattr(message, name))
    return None
