"""Hostile configuration files for the fuzz tests of the settings and fleet readers and of
the installer's fleet-config checker: TOML-able trees of huge integers, NaN and
infinities, strings with NUL, lone surrogates or of great length, datetimes at the ends
of the calendar, nesting deeper than the reader goes, and paths to files no config
should be (binary, endless, a FIFO, names too long); and valid files to replace one
value of. `prepare(directory)` makes the files the documents name; `toml()` writes one.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from datetime import UTC, date, datetime, time, timedelta, timezone
from pathlib import Path

from hypothesis import strategies as st

NOW = datetime(2026, 3, 2, 12, tzinfo=UTC)
DIR = "@DIR@"  # stands for the test's directory of prepared files
PEM = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"


class Raw(str):
    """TOML written as it is: what Python cannot hold as a value (a 5000-digit integer,
    nesting deeper than any parser goes)."""


# --- values ------------------------------------------------------------------------------

offsets = st.integers(-(23 * 60 + 59), 23 * 60 + 59).map(lambda m: timezone(timedelta(minutes=m)))
files = st.sampled_from(
    [
        f"{DIR}/ca.pem",
        f"{DIR}/token",
        f"{DIR}/binary",
        f"{DIR}/fifo",
        f"{DIR}/missing",
        DIR,  # a directory
        "/dev/zero",
        "/dev/null",
        f"{DIR}/\0",
        f"{DIR}/{'n' * 300}",
        "/" + "d/" * 3000,
        "",
    ]
)
strings = (
    st.text()
    | st.text(st.characters(min_codepoint=0, max_codepoint=0x1F) | st.just("\0"))
    | st.sampled_from(["\ud800", "a\udfffb", "x" * 100_000, "09:00", "25:00", "9:5", "mon"])
    | st.sampled_from(["h:7443", "h:99999", "[::1]:7443", "h:\u0667\u0664", "qemu+tls://h/system"])
    | files
)
numbers = (
    st.integers()
    | st.integers(10**309, 10**4000)  # beyond every float
    | st.integers(-(10**4000), -(10**309))
    | st.sampled_from([Raw("9" * 5000), Raw("-" + "9" * 5000)])  # beyond Python's reader
    | st.floats()  # NaN and both infinities included
    | st.sampled_from([1e12, -1e12, 1e308, 5e-324, 2**63, 2**64])
)
moments = (
    st.datetimes(timezones=offsets)
    | st.sampled_from(
        [
            datetime.min.replace(tzinfo=timezone(timedelta(hours=9))),
            datetime.max.replace(tzinfo=timezone(timedelta(hours=-9))),
            datetime.max.replace(tzinfo=UTC),
            datetime.min.replace(tzinfo=UTC),
            NOW + timedelta(days=400),
            NOW + timedelta(days=365 * 200),
        ]
    )
    | st.datetimes()  # local, without an offset
    | st.dates()
    | st.times()
)
nested = st.integers(1, 3000).map(lambda n: Raw("[" * n + "]" * n)) | st.integers(1, 3000).map(
    lambda n: Raw("{a = " * n + "1" + "}" * n)
)
scalars = st.booleans() | numbers | strings | moments | nested
keys = st.sampled_from(
    [
        "enabled",
        "idle_after",
        "evacuate_after",
        "checkpoint_after",
        "caps",
        "in_use",
        "idle",
        "cpu_percent",
        "memory_mib",
        "memory_percent",
        "schedule",
        "days",
        "start",
        "end",
        "label",
        "owner_load",
        "pause_above_percent",
        "pause_after",
        "resume_below_percent",
        "resume_after",
        "pause_on_battery",
        "pause_on_heat",
        "max_temperature_c",
        "snooze_until",
        "max_cpu_percent",
        "max_memory_mib",
        "max_memory_percent",
        "blackout",
        "owner_may_disable",
        "reason",
        "coordinator",
        "address",
        "enroll_address",
        "ca_file",
        "ca_pem",
        "token",
        "token_file",
        "migration",
        "libvirt_uri",
        "migrate_uri",
        "tls",
    ]
) | st.text(max_size=8)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=4),
    max_leaves=12,
)
documents = st.dictionaries(keys, values, max_size=6)


# The worst of each kind, tried at every place of a valid file.
WORST: list[object] = [
    Raw("9" * 5000),
    Raw("-" + "9" * 5000),
    10**400,
    -(10**400),
    2**64,
    float("nan"),
    float("inf"),
    float("-inf"),
    1e12,
    -1e12,
    datetime.max.replace(tzinfo=timezone(timedelta(hours=-9))),
    datetime.min.replace(tzinfo=timezone(timedelta(hours=9))),
    datetime.max.replace(tzinfo=UTC),
    NOW + timedelta(days=400),
    NOW + timedelta(days=365 * 200),
    datetime(2026, 3, 2, 12),
    date(2026, 3, 2),
    time(23, 59, 59, 999_999),
    "",
    "\0",
    "a\udfffb",
    "x" * 100_000,
    "25:00",
    "h:\u0667\u0664",
    f"{DIR}/binary",
    f"{DIR}/fifo",
    f"{DIR}/missing",
    DIR,
    "/dev/zero",
    f"{DIR}/\0",
    f"{DIR}/{'n' * 300}",
    "/" + "d/" * 3000,
    Raw("[" * 3000 + "]" * 3000),
    Raw("{a = " * 3000 + "1" + "}" * 3000),
    [],
    {},
    True,
]


def hostile(key: str | int) -> st.SearchStrategy[object]:
    """Values to put where `key` is: first what hurts a key of its kind most, then
    anything at all."""
    if key in {"ca_file", "token_file"}:
        kind: st.SearchStrategy[object] = files
    elif key in {"start", "end", "snooze_until"}:
        kind = moments
    elif isinstance(key, str) and key.endswith(("_percent", "_after", "_mib", "_c")):
        kind = numbers
    else:
        kind = strings
    return kind | nested | values


# --- valid files, one value replaced -------------------------------------------------------

OWNER = {
    "enabled": True,
    "idle_after": 180,
    "snooze_until": NOW + timedelta(hours=1),
    "owner_load": {"pause_above_percent": 25, "pause_after": 10, "resume_after": 30.5},
    "caps": {"in_use": {"cpu_percent": 0, "memory_mib": 4096}, "idle": {"memory_percent": 50}},
    "schedule": [
        {"label": "office", "days": ["mon", "fri"], "start": "09:00", "end": time(17)},
        {"days": ["sun"], "start": "18:00", "end": "08:00", "caps": {"idle": {"cpu_percent": 5}}},
    ],
}
FLEET = {
    "reason": "IT policy",
    "max_cpu_percent": 50,
    "max_memory_mib": 16384,
    "owner_may_disable": False,
    "blackout": [{"label": "backups", "days": ["mon"], "start": "01:00", "end": "03:00"}],
    "coordinator": {
        "address": "coord.example.org:7443",
        "ca_file": f"{DIR}/ca.pem",
        "token_file": f"{DIR}/token",
    },
    "migration": {"libvirt_uri": "qemu+tls://desk/system", "migrate_uri": "tcp://desk"},
}


def places(tree: object, path: tuple[str | int, ...] = ()) -> list[tuple[str | int, ...]]:
    """Every path to a value in `tree` (tables and arrays included)."""
    found = [path] if path else []
    if isinstance(tree, Mapping):
        for key, value in tree.items():
            found += places(value, (*path, key))
    elif isinstance(tree, list):
        for index, value in enumerate(tree):
            found += places(value, (*path, index))
    return found


def replaced(tree: object, path: tuple[str | int, ...], value: object) -> object:
    if not path:
        return value
    head, rest = path[0], path[1:]
    if isinstance(tree, Mapping):
        return {k: replaced(v, rest, value) if k == head else v for k, v in tree.items()}
    assert isinstance(tree, list)
    return [replaced(v, rest, value) if i == head else v for i, v in enumerate(tree)]


def tables(tree: Mapping[str, object]) -> list[tuple[str | int, ...]]:
    """The paths of every table in `tree`, the root first."""
    return [(), *(p for p in places(tree) if isinstance(at(tree, p), Mapping))]


def at(tree: object, path: tuple[str | int, ...]) -> object:
    for step in path:
        tree = tree[step]  # type: ignore[index]
    return tree


# --- writing TOML ------------------------------------------------------------------------


def toml(document: Mapping[str, object], directory: Path) -> bytes:
    """`document` as a TOML file, every value inline; lone surrogates are written as the
    bytes they would be (which no UTF-8 reader takes)."""
    lines = [f"{_string(k)} = {_value(v)}" for k, v in document.items()]
    text = "\n".join(lines).replace(DIR, str(directory))
    return text.encode("utf-8", "surrogatepass")


def _string(text: str) -> str:
    out = []
    for char in text:
        if char in '"\\':
            out.append("\\" + char)
        elif char < " " or char == "\x7f":
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


def _value(value: object) -> str:
    if isinstance(value, Raw):
        return str(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return _string(value)
    if isinstance(value, datetime | date | time):
        return value.isoformat()
    if isinstance(value, list):
        return "[" + ", ".join(_value(item) for item in value) + "]"
    assert isinstance(value, Mapping)
    return "{" + ", ".join(f"{_string(k)} = {_value(v)}" for k, v in value.items()) + "}"


def prepare(directory: Path) -> None:
    """The files the documents name, made in `directory` (which `DIR` stands for)."""
    (directory / "ca.pem").write_text(PEM)
    (directory / "token").write_text("dtk_abc_def\n")
    (directory / "binary").write_bytes(bytes(range(256)) * 4)
    os.mkfifo(directory / "fifo")


def shown_value(value: object) -> str:
    """`value` short, for a failure message."""
    text = repr(value) if not isinstance(value, int) or value.bit_length() < 1000 else "10**400"
    return text if len(text) <= 60 else text[:57] + "..."
