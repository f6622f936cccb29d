"""The administrator's fleet file (``fleet.toml``): the fleet's bounds, and its coordinator.

The format is documented in `donor_app.settings.config`. `load_fleet` reads the bounds
and blackouts (`FleetPolicy`; none for a missing file); `load_link_config` reads the
[coordinator] and [migration] tables (`LinkConfig`, `MigrationEndpoint`). Standard library
and the domain only: the fleet-config checker runs these same parsers before the
application is installed.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from donor_app.domain.fleet import FleetPolicy
from donor_app.domain.settings import Window
from donor_app.settings.toml_reader import (
    MAX_FILE_BYTES,
    Table,
    Unreadable,
    read_file,
    read_toml,
    read_window,
    shown,
    too_large,
    validated,
)

_DEFAULT_FLEET = FleetPolicy()


def load_fleet(file: Path) -> FleetPolicy:
    """The fleet policy from `file` (no bounds if it does not exist)."""
    data = read_toml(file)
    return _DEFAULT_FLEET if data is None else parse_fleet(data, file)


def parse_fleet(data: Mapping[str, object], file: Path) -> FleetPolicy:
    """A fleet policy from parsed TOML; `file` is only named in errors."""
    root = Table(file, data)
    max_cpu = root.number("max_cpu_percent", _DEFAULT_FLEET.max_cpu_percent)
    max_mib = root.optional_integer("max_memory_mib")
    max_percent = root.optional_number("max_memory_percent")
    blackout = tuple(_blackout(entry) for entry in root.tables("blackout"))
    may_disable = root.boolean("owner_may_disable", _DEFAULT_FLEET.owner_may_disable)
    reason = root.string("reason", _DEFAULT_FLEET.reason)
    root.table("coordinator")  # read by `load_link_config`; checked there
    root.table("migration")  # read by `load_link_config` too
    root.done()
    return validated(
        file,
        lambda: FleetPolicy(
            max_cpu_percent=max_cpu,
            max_memory_mib=max_mib,
            max_memory_percent=max_percent,
            blackout=blackout,
            owner_may_disable=may_disable,
            reason=reason,
        ),
    )


def _blackout(table: Table) -> Window:
    window = read_window(table)
    table.done()
    return window


# --- the coordinator link (the fleet file's [coordinator] table) ---------------------------

# A host is a bracketed IPv6 address, or names and numbers of 1-63 characters between
# single dots, as a resolver takes them ("a..b" would fail there, not here).
_HOST_PORT = re.compile(
    r"^(\[[0-9A-Fa-f:.]+\]|(?:[A-Za-z0-9-]{1,63}\.)*[A-Za-z0-9-]{1,63}\.?):([0-9]{1,5})$"
)
_MAX_HOST = 253
DEFAULT_ENROLL_PORT = 7444


@dataclass(frozen=True, slots=True)
class LinkConfig:
    """Where the coordinator is and how to join it.

    `address`: the main port (mTLS). `enroll_address`: the enrollment port (default: the
    same host, port 7444). `ca_pem`: the coordinator's CA certificate, to verify it.
    `token`: the enrollment token, when this donor has not enrolled yet; `token_file`
    (if the token came from one) is removed after a successful enrollment.
    """

    address: str
    enroll_address: str
    ca_pem: bytes
    token: str | None = None
    token_file: Path | None = None
    migration: MigrationEndpoint | None = None


_MIGRATION_SCHEMES = ("qemu", "qemu+tls", "qemu+ssh", "qemu+unix", "qemu+tcp")


@dataclass(frozen=True, slots=True)
class MigrationEndpoint:
    """How other donors reach this donor's libvirt to live-migrate guests to it
    ([migration] in the fleet file). Without one, guests come here only cold (restored
    from a checkpoint).

    `libvirt_uri`: this host's libvirt as another donor opens it (between workstations
    `qemu+tls://HOST/system`, authenticated by the fleet's certificates; see
    docs/migration.md). `migrate_uri`: where the migration stream connects
    (`tcp://HOST`). `tls`: encrypt that stream too.
    """

    libvirt_uri: str
    migrate_uri: str
    tls: bool = False


def parse_migration_endpoint(data: Mapping[str, object], file: Path) -> MigrationEndpoint | None:
    table = Table(file, data).table("migration")
    if table is None:
        return None
    libvirt_uri = table.string("libvirt_uri", "")
    migrate_uri = table.string("migrate_uri", "")
    tls = table.boolean("tls", False)
    table.done()
    scheme = libvirt_uri.split("://", 1)[0] if "://" in libvirt_uri else ""
    if scheme not in _MIGRATION_SCHEMES:
        raise table.error(
            "libvirt_uri",
            f"{shown(libvirt_uri)} is not a libvirt URI ({', '.join(_MIGRATION_SCHEMES)})",
        )
    if not migrate_uri.startswith("tcp://") or len(migrate_uri) <= len("tcp://"):
        raise table.error("migrate_uri", f'must be "tcp://HOST[:PORT]", got {shown(migrate_uri)}')
    return MigrationEndpoint(libvirt_uri, migrate_uri, tls)


def _host_port(table: Table, name: str, value: str) -> str:
    match = _HOST_PORT.fullmatch(value)
    if match is None or len(match.group(1)) > _MAX_HOST or not 0 < int(match.group(2)) <= 65535:
        raise table.error(name, f'must be "host:port", got {shown(value)}')
    return value


def parse_link_config(data: Mapping[str, object], file: Path) -> LinkConfig | None:
    """The [coordinator] table of a fleet file, None without one. Files it names
    (ca_file, token_file) are read now; a ca_file that is missing, and either that cannot
    be read, is a ConfigError naming the key (a missing token_file: no token)."""
    table = Table(file, data).table("coordinator")
    if table is None:
        return None
    address = _host_port(table, "address", table.string("address", ""))
    host = address.rsplit(":", 1)[0]
    enroll = table.string("enroll_address", f"{host}:{DEFAULT_ENROLL_PORT}")
    enroll = _host_port(table, "enroll_address", enroll)
    ca_pem_text = table.string("ca_pem", "")
    ca_file = table.path("ca_file")
    token = table.string("token", "") or None
    token_file = table.path("token_file")
    table.done()
    if bool(ca_pem_text) == bool(ca_file):
        raise table.error("ca_file", "give either ca_file or ca_pem (the coordinator's CA)")
    if ca_file is not None:
        ca_pem = _named_file(table, "ca_file", ca_file)
        if ca_pem is None:
            raise table.error("ca_file", f"cannot read {ca_file}: it does not exist")
    else:
        try:
            ca_pem = ca_pem_text.encode()
        except UnicodeEncodeError:  # a lone surrogate: only in data handed over directly
            raise table.error("ca_pem", "must be PEM text") from None
    if b"BEGIN CERTIFICATE" not in ca_pem:
        raise table.error("ca_file" if ca_file else "ca_pem", "is not a PEM certificate")
    if token is None and token_file is not None:
        content = _named_file(table, "token_file", token_file)
        if content is not None:
            try:
                token = content.decode("utf-8").strip() or None
            except UnicodeDecodeError:
                raise table.error("token_file", "is not UTF-8 text") from None
    migration = parse_migration_endpoint(data, file)
    return LinkConfig(address, enroll, ca_pem, token, token_file, migration)


def _named_file(table: Table, key: str, file: Path) -> bytes | None:
    """The content of a file the table names under `key`; None if it does not exist.
    `ConfigError` naming `key` if it cannot be read or is too large to be what it names
    (a token, a CA certificate)."""
    try:
        content = read_file(file)
    except Unreadable as error:
        raise table.error(key, f"cannot read {file}: {error}") from None
    if content is not None and too_large(content):
        raise table.error(key, f"{file} is larger than {MAX_FILE_BYTES // 1024} KiB")
    return content


def load_link_config(file: Path) -> LinkConfig | None:
    """The coordinator link from a fleet file (None: no file, or no [coordinator])."""
    data = read_toml(file)
    return None if data is None else parse_link_config(data, file)
