"""Reading a TOML configuration file so that every mistake names the file and the key.

`read_toml` reads and parses a file; `Table` wraps one of its tables with typed getters
whose errors are `ConfigError`s naming the dotted key ("schedule[1].caps.idle.cpu_percent")
and what is allowed, and whose `done()` rejects the keys nobody asked for. Both config
files (`owner_file`, `fleet_file`) are read with these. Standard library and the domain
only: the fleet-config checker carries this module.

Whatever a file holds, only `ConfigError` comes out: an agent reads these files on its
engine thread, where any other exception would stop every decision.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import stat
import tomllib
from collections.abc import Callable, Mapping
from datetime import datetime, time, timedelta
from pathlib import Path
from typing import TypeVar

from donor_app.domain.settings import MAX_DURATION, FieldError, Weekday, Window

_T = TypeVar("_T")

_DAY_NAMES = {day.name.lower(): day for day in Weekday}
_TIME = re.compile(r"(\d{1,2}):(\d{2})(?::(\d{2})(?:\.(\d{1,6}))?)?")

MAX_FILE_BYTES = 1 << 20
"""The largest configuration file (or file one names) that is read at all."""


class ConfigError(Exception):
    """A configuration file cannot be used: names the file, the dotted key (empty for
    the file as a whole) and the reason."""

    def __init__(self, file: Path, key: str, reason: str) -> None:
        super().__init__(f"{file}: {key}: {reason}" if key else f"{file}: {reason}")
        self.file = file
        self.key = key
        self.reason = reason


class Unreadable(Exception):
    """A file cannot be read; the text says why, in words for an owner or an admin."""


def read_file(file: Path) -> bytes | None:
    """The content of `file` up to one byte more than `MAX_FILE_BYTES` (so that a caller
    can tell it is too large); None if it does not exist. `Unreadable` if the path is
    none the system takes, names no regular file, or cannot be read."""
    try:
        # Non-blocking, so that a FIFO does not hang the reader; it is refused below.
        fd = os.open(file, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except FileNotFoundError:
        return None
    except OSError as error:
        raise Unreadable(error.strerror or str(error)) from None
    except ValueError:  # a NUL in the path
        raise Unreadable("the path contains a NUL character") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            # /dev/zero would never end; a directory or a device is no config.
            raise Unreadable("not a regular file")
        with os.fdopen(fd, "rb", closefd=False) as stream:
            return stream.read(MAX_FILE_BYTES + 1)
    except OSError as error:
        raise Unreadable(error.strerror or str(error)) from None
    finally:
        os.close(fd)


def too_large(content: bytes) -> bool:
    """Whether `content` (from `read_file`) is more than `MAX_FILE_BYTES`."""
    return len(content) > MAX_FILE_BYTES


def read_toml(file: Path) -> dict[str, object] | None:
    """The parsed content of `file`; None if it does not exist. `ConfigError` for a file
    that cannot be read, is too large, is not UTF-8 or is not valid TOML."""
    try:
        raw = read_file(file)
    except Unreadable as error:
        raise ConfigError(file, "", f"cannot read it: {error}") from None
    return None if raw is None else parse_toml(raw, file)


def parse_toml(raw: bytes, file: Path) -> dict[str, object]:
    """`raw` (from `read_file`) parsed; `ConfigError` naming `file` if it is too large, not
    UTF-8 or not TOML that Python can hold."""
    if too_large(raw):
        raise ConfigError(file, "", f"is larger than {MAX_FILE_BYTES // 1024} KiB")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(file, "", "is not UTF-8 text") from None
    try:
        return tomllib.loads(text)
    except RecursionError:
        raise ConfigError(file, "", "has arrays or tables nested too deeply") from None
    except ValueError as error:
        # TOMLDecodeError, and the ValueError for an integer of more digits than Python
        # converts (over 4300).
        raise ConfigError(file, "", f"is not valid TOML: {error}") from None


def validated(file: Path, build: Callable[[], _T]) -> _T:
    """Build a domain object; its range checks become `ConfigError`s."""
    try:
        return build()
    except FieldError as error:
        raise ConfigError(file, error.path, error.reason) from None


def read_window(table: Table) -> Window:
    """The days and hours of a [[schedule]] or [[blackout]] entry (label optional)."""
    return Window(
        days=table.days("days"),
        start=table.time_of_day("start"),
        end=table.time_of_day("end"),
        label=table.string("label", ""),
    )


class Table:
    """A TOML table being read: typed getters whose errors name the dotted key, and
    `done()`, which rejects the keys nobody asked for."""

    def __init__(self, file: Path, data: Mapping[str, object], path: str = "") -> None:
        self._file = file
        self._data = data
        self._path = path
        self._asked: list[str] = []

    def key(self, name: str) -> str:
        """The dotted path of `name` in this table."""
        return f"{self._path}.{name}" if self._path else name

    def error(self, name: str, reason: str) -> ConfigError:
        """A `ConfigError` for key `name` of this table."""
        return ConfigError(self._file, self.key(name), reason)

    def done(self) -> None:
        """Raise `ConfigError` for the first key that no getter asked for."""
        for name in self._data:
            if name not in self._asked:
                allowed = ", ".join(self._asked)
                raise self.error(name, f"unknown key (allowed here: {allowed})")

    def _get(self, name: str) -> object | None:
        self._asked.append(name)
        return self._data.get(name)

    def boolean(self, name: str, default: bool) -> bool:
        value = self._get(name)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self.error(name, f"must be true or false, got {shown(value)}")
        return value

    def optional_number(self, name: str) -> float | None:
        value = self._get(name)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.error(name, f"must be a number, got {shown(value)}")
        try:
            return float(value)
        except OverflowError:
            # An integer beyond every float is beyond every range too: as an infinity,
            # the range check that follows names the range.
            return math.inf if value > 0 else -math.inf

    def number(self, name: str, default: float) -> float:
        value = self.optional_number(name)
        return default if value is None else value

    def optional_integer(self, name: str) -> int | None:
        value = self._get(name)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(name, f"must be a whole number, got {shown(value)}")
        return value

    def string(self, name: str, default: str) -> str:
        value = self._get(name)
        if value is None:
            return default
        if not isinstance(value, str):
            raise self.error(name, f"must be a string, got {shown(value)}")
        return value

    def seconds(self, name: str, default: timedelta) -> timedelta:
        value = self.optional_number(name)
        if value is None:
            return default
        try:
            return timedelta(seconds=value)
        except (OverflowError, ValueError):
            raise self.error(
                name,
                f"must be a number of seconds from 0 to {MAX_DURATION.days} days, got {value:g}",
            ) from None

    def path(self, name: str) -> Path | None:
        """A file path; None when unset or empty."""
        text = self.string(name, "")
        if "\0" in text:
            raise self.error(name, f"must be a file path without NUL characters, got {shown(text)}")
        return Path(text) if text else None

    def time_of_day(self, name: str) -> time:
        value = self._required(name)
        if isinstance(value, time):
            return value
        match = _TIME.fullmatch(value) if isinstance(value, str) else None
        if match is not None:
            hour, minute, second, fraction = match.groups()
            with contextlib.suppress(ValueError):  # e.g. 25:00
                return time(
                    int(hour), int(minute), int(second or 0), int((fraction or "").ljust(6, "0"))
                )
        raise self.error(name, f'must be a time of day like "09:00", got {shown(value)}')

    def days(self, name: str) -> frozenset[Weekday]:
        value = self._required(name)
        if not isinstance(value, list) or not all(
            isinstance(day, str) and day.lower() in _DAY_NAMES for day in value
        ):
            allowed = ", ".join(f'"{day}"' for day in _DAY_NAMES)
            raise self.error(name, f"must be a list of days from {allowed}, got {shown(value)}")
        return frozenset(_DAY_NAMES[day.lower()] for day in value)

    def moment(self, name: str) -> datetime | None:
        value = self._get(name)
        if value is not None and not isinstance(value, datetime):
            raise self.error(
                name, f"must be a date and time like 2025-01-06T15:00:00+01:00, got {shown(value)}"
            )
        return value

    def table(self, name: str) -> Table | None:
        value = self._get(name)
        if value is None:
            return None
        if not isinstance(value, dict):
            raise self.error(name, f"must be a table ([{self.key(name)}]), got {shown(value)}")
        return Table(self._file, value, self.key(name))

    def tables(self, name: str) -> list[Table]:
        value = self._get(name)
        if value is None:
            return []
        if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
            raise self.error(name, f"must be an array of tables ([[{self.key(name)}]])")
        return [
            Table(self._file, item, f"{self.key(name)}[{index}]")
            for index, item in enumerate(value)
        ]

    def _required(self, name: str) -> object:
        value = self._get(name)
        if value is None:
            raise self.error(name, "is required")
        return value


def shown(value: object) -> str:
    """A value as the owner wrote it, short."""
    try:
        text = repr(value) if not isinstance(value, bool) else str(value).lower()
    except (ValueError, RecursionError):
        # An integer of more digits than Python writes out, or nesting deeper than repr
        # goes: only data handed over directly (not read from a file) holds these.
        return f"a {type(value).__name__} too large to show"
    return text if len(text) <= 40 else text[:37] + "..."
