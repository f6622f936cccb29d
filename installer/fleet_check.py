"""Checks an administrator's fleet.toml and lands it in the site config dir.

Run by the installers (the .deb's preinst/postinst, install.sh) with the system's
python3, BEFORE the application is unpacked: it is packed with the few pure modules it
needs (donor_app.domain, the fleet file's reader in donor_app.settings and
donor_app.atomic_file: standard library only) into ``fleet-check.pyz`` by
``installer/build-fleet-check``. The checks are the agent's own
parsers (`parse_fleet`, `parse_link_config`), so whatever passes here the agent accepts.

    python3 fleet-check.pyz check   SOURCE            # validate only; writes nothing
    python3 fleet-check.pyz install SOURCE SITE_DIR   # validate, then write SITE_DIR/…

``install`` writes ``fleet.toml`` (0644: the policy is public to the machine's users),
and, from the ``[coordinator]`` table, the enrollment token to ``enroll-token`` (0600:
it could enroll an impostor) and the CA to ``coordinator-ca.pem`` (0644), rewriting the
table to point at those files, so no secret sits in the world-readable fleet.toml and
nothing depends on the install media staying mounted.

Exit codes (documented for fleet tools in installer/README.md): 0 done, 2 usage,
3 the fleet config is missing or unreadable, 4 it is invalid (the message names the
file, the key and the reason), 5 the site directory cannot be written.
"""

from __future__ import annotations

import datetime as dt
import socket
import sys
from collections.abc import Mapping
from pathlib import Path

from donor_app.atomic_file import write_atomic
from donor_app.settings.fleet_file import parse_fleet, parse_link_config
from donor_app.settings.toml_reader import ConfigError, Unreadable, parse_toml, read_file

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_MISSING = 3
EXIT_INVALID = 4
EXIT_WRITE = 5

FLEET_FILE = "fleet.toml"
TOKEN_FILE = "enroll-token"
CA_FILE = "coordinator-ca.pem"


class CheckFailed(Exception):
    """The fleet config cannot be used; `code` is the process exit code."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def read_source(source: Path) -> dict[str, object]:
    """The parsed TOML of `source`, read as the agent reads it; CheckFailed names the
    file and what is wrong."""
    try:
        raw = read_file(source)
    except Unreadable as error:
        raise CheckFailed(EXIT_MISSING, f"{source}: cannot read it: {error}") from None
    if raw is None:
        raise CheckFailed(EXIT_MISSING, f"{source}: the fleet config does not exist")
    try:
        return parse_toml(raw, source)
    except ConfigError as error:
        raise CheckFailed(EXIT_INVALID, str(error)) from None


def check(source: Path) -> tuple[dict[str, object], list[str]]:
    """Validate `source` as the agent would; returns its data and notes for the admin."""
    data = read_source(source)
    try:
        parse_fleet(data, source)
        link = parse_link_config(data, source)
    except ConfigError as error:
        raise CheckFailed(EXIT_INVALID, str(error)) from None
    notes = []
    if link is None:
        notes.append("no [coordinator] table: this computer will not join a fleet")
    elif link.token is None:
        notes.append(
            "no enrollment token: fine if this computer is enrolled already, "
            "else the agent reports 'refused' until one is given"
        )
    else:
        notes.append(f"will enroll with the coordinator at {link.address}")
    return data, notes


def landed(data: Mapping[str, object], site_dir: Path) -> tuple[dict[str, object], str, bytes]:
    """The fleet data as it lands in `site_dir`, the token (or "") and the CA PEM (or b"").

    The [coordinator] table's secrets and files move out: token → `enroll-token`, CA →
    `coordinator-ca.pem`, both referenced by path. Input already checked by `check`.
    """
    out = dict(data)
    table = data.get("coordinator")
    if not isinstance(table, Mapping):
        return out, "", b""
    coordinator = dict(table)
    link = parse_link_config(data, Path("fleet config"))
    assert link is not None  # a [coordinator] table parses to a link or raises
    for key in ("token", "token_file", "ca_file", "ca_pem"):
        coordinator.pop(key, None)
    coordinator["ca_file"] = str(site_dir / CA_FILE)
    token = link.token or ""
    if token:
        coordinator["token_file"] = str(site_dir / TOKEN_FILE)
    out["coordinator"] = coordinator
    return out, token, link.ca_pem


def install(source: Path, site_dir: Path) -> list[str]:
    """Check `source`, then write it (and its token and CA) into `site_dir`."""
    data, notes = check(source)
    fleet, token, ca_pem = landed(data, site_dir)
    try:
        site_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
        if ca_pem:
            write_atomic(site_dir / CA_FILE, ca_pem, 0o644)
        if token:
            write_atomic(site_dir / TOKEN_FILE, token.encode() + b"\n", 0o600)
        write_atomic(site_dir / FLEET_FILE, dumps(fleet).encode(), 0o644)
    except OSError as error:
        raise CheckFailed(EXIT_WRITE, f"{site_dir}: cannot write: {error}") from None
    notes.append(f"fleet config installed in {site_dir / FLEET_FILE}")
    link = parse_link_config(data, source)
    if link is not None and not reachable(link.enroll_address):
        notes.append(
            f"the coordinator's enrollment port {link.enroll_address} does not answer now; "
            "the agent keeps trying (with backoff) and enrolls once it does"
        )
    return notes


def reachable(address: str, timeout_s: float = 3.0) -> bool:
    """Whether a TCP connection to "host:port" opens (a hint for the admin, never fatal:
    the coordinator may simply be down during a roll-out)."""
    host, port = address.rsplit(":", 1)
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            return True
    except (OSError, UnicodeError):  # UnicodeError: a name the resolver cannot encode
        return False


# --- a TOML writer for what a fleet file holds ----------------------------------------------
# tomllib only reads. The fleet schema is small (scalars, string arrays, times, tables and
# arrays of tables), so a writer for exactly those types beats a new dependency.


def dumps(data: Mapping[str, object]) -> str:
    """`data` as TOML: top-level values first, then tables, then arrays of tables."""
    lines = [
        "# Written by the donor-app installer from the administrator's fleet config.",
        "# Format: see donor_app/settings/config.py.",
    ]
    _emit_table(lines, data, [])
    return "\n".join(lines) + "\n"


def _emit_table(lines: list[str], table: Mapping[str, object], path: list[str]) -> None:
    tables: list[tuple[str, Mapping[str, object]]] = []
    arrays: list[tuple[str, list[Mapping[str, object]]]] = []
    for key, value in table.items():
        if isinstance(value, Mapping):
            tables.append((key, value))
        elif isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value):
            arrays.append((key, value))
        else:
            lines.append(f"{_key(key)} = {_value(value)}")
    for key, sub in tables:
        lines.extend(["", f"[{_dotted([*path, key])}]"])
        _emit_table(lines, sub, [*path, key])
    for key, items in arrays:
        for item in items:
            lines.extend(["", f"[[{_dotted([*path, key])}]]"])
            _emit_table(lines, item, [*path, key])


def _dotted(path: list[str]) -> str:
    return ".".join(_key(part) for part in path)


def _key(key: str) -> str:
    bare = key and all(c.isascii() and (c.isalnum() or c in "-_") for c in key)
    return key if bare else _string(key)


def _string(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    escaped = "".join(c if c >= " " and c != "\x7f" else f"\\u{ord(c):04x}" for c in escaped)
    return f'"{escaped}"'


def _value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return _string(value)
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, list):
        return "[" + ", ".join(_value(item) for item in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def main(argv: list[str]) -> int:
    usage = "usage: fleet-check check SOURCE | fleet-check install SOURCE SITE_DIR"
    try:
        if len(argv) == 2 and argv[0] == "check":
            notes = check(Path(argv[1]))[1]
        elif len(argv) == 3 and argv[0] == "install":
            notes = install(Path(argv[1]), Path(argv[2]))
        else:
            print(usage, file=sys.stderr)
            return EXIT_USAGE
    except CheckFailed as failure:
        print(f"donor-app: fleet config rejected: {failure}", file=sys.stderr)
        return failure.code
    for note in notes:
        print(f"donor-app: {note}", file=sys.stderr)
    return EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
