"""The owner's settings and the fleet policy as TOML files.

The owner's ``settings.toml`` (in the user config dir; every key is optional, these are
the defaults plus a schedule)::

    enabled = true              # false: do not donate (unless the fleet forbids it)
    idle_after = 180            # seconds without input before the machine is idle again
    evacuate_after = 120        # seconds of continuous use before guests move away
    checkpoint_after = 600      # seconds of continuous use before guests go to disk
    pause_on_battery = true
    pause_on_heat = true        # where a temperature sensor exists
    max_temperature_c = 85
    snooze_until = 2025-01-06T15:00:00+01:00    # optional; needs the UTC offset

    [owner_load]                # your own programs' CPU use, guests excluded
    pause_above_percent = 25
    pause_after = 10            # seconds
    resume_below_percent = 15
    resume_after = 30           # seconds

    [caps.in_use]               # while you use the computer; 0 % CPU pauses the guests
    cpu_percent = 0             # of the whole computer, 0-100
    memory_percent = 50         # of the RAM, 0-100; and/or memory_mib = 4096
    [caps.idle]                 # while nobody uses it
    cpu_percent = 100
    memory_percent = 50

    # No [[schedule]] entry: donate at any time. With entries: only inside them.
    [[schedule]]
    label = "office hours"
    days = ["mon", "tue", "wed", "thu", "fri"]
    start = "09:00"             # local time; TOML times (09:00:00) work too
    end = "17:00"
    [schedule.caps.in_use]      # optional; unset keys come from [caps]
    cpu_percent = 25

    [[schedule]]
    label = "nights"
    days = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
    start = "18:00"
    end = "08:00"               # before start: the window runs past midnight

Memory: setting one of ``memory_mib`` / ``memory_percent`` in a table replaces both
inherited values; setting both caps by the smaller. Windows must not overlap; ``end``
equal to ``start`` is an error.

The administrator's ``fleet.toml`` (in the site config dir, e.g. /etc/xdg/donor_app)::

    reason = "IT policy, questions to it@example.org"   # shown beside locked settings
    max_cpu_percent = 50        # no cap may pass these
    max_memory_percent = 50     # and/or max_memory_mib = 16384
    owner_may_disable = false   # the owner cannot switch donating off

    [[blackout]]                # no donating in these hours, whatever the owner sets
    label = "nightly backups"
    days = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
    start = "01:00"
    end = "03:00"

    [coordinator]               # optional: join a fleet (see load_link_config)
    address = "coordinator.example.org:7443"
    ca_file = "/etc/donor_app/coordinator-ca.pem"
    token_file = "/etc/donor_app/enroll-token"   # removed after enrolling

A missing file means the defaults (no bounds for the fleet). A key that is unknown, of
the wrong type or out of range raises `ConfigError` naming the file, the dotted key
("schedule[1].caps.idle.cpu_percent") and what is allowed. `SettingsStore` keeps the
last good values in force while a file is invalid.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import tempfile
import tomllib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta
from pathlib import Path
from typing import Generic, TypeVar

from donor_app.domain.fleet import FleetPolicy
from donor_app.domain.settings import (
    Caps,
    DonationWindow,
    FieldError,
    Limits,
    OwnerLoadLimit,
    Settings,
    Weekday,
    Window,
)

_log = logging.getLogger(__name__)

_T = TypeVar("_T")

_DEFAULT_SETTINGS = Settings()
_DEFAULT_LOAD = OwnerLoadLimit()
_DEFAULT_FLEET = FleetPolicy()
_DAY_NAMES = {day.name.lower(): day for day in Weekday}
_TIME = re.compile(r"(\d{1,2}):(\d{2})(?::(\d{2})(?:\.(\d{1,6}))?)?")


class ConfigError(Exception):
    """A configuration file cannot be used: names the file, the dotted key (empty for
    the file as a whole) and the reason."""

    def __init__(self, file: Path, key: str, reason: str) -> None:
        super().__init__(f"{file}: {key}: {reason}" if key else f"{file}: {reason}")
        self.file = file
        self.key = key
        self.reason = reason


# --- reading -----------------------------------------------------------------------


def load_settings(file: Path) -> Settings:
    """The owner's settings from `file` (defaults if it does not exist)."""
    data = _read_toml(file)
    return _DEFAULT_SETTINGS if data is None else parse_settings(data, file)


def load_fleet(file: Path) -> FleetPolicy:
    """The fleet policy from `file` (no bounds if it does not exist)."""
    data = _read_toml(file)
    return _DEFAULT_FLEET if data is None else parse_fleet(data, file)


def parse_settings(data: Mapping[str, object], file: Path) -> Settings:
    """Settings from parsed TOML; `file` is only named in errors."""
    root = _Table(file, data)
    caps = _caps(root.table("caps"), _DEFAULT_SETTINGS.caps)
    schedule = tuple(_donation_window(entry, caps) for entry in root.tables("schedule"))
    enabled = root.boolean("enabled", _DEFAULT_SETTINGS.enabled)
    idle_after = root.seconds("idle_after", _DEFAULT_SETTINGS.idle_after)
    evacuate_after = root.seconds("evacuate_after", _DEFAULT_SETTINGS.evacuate_after)
    checkpoint_after = root.seconds("checkpoint_after", _DEFAULT_SETTINGS.checkpoint_after)
    owner_load = _owner_load(root.table("owner_load"))
    pause_on_battery = root.boolean("pause_on_battery", _DEFAULT_SETTINGS.pause_on_battery)
    pause_on_heat = root.boolean("pause_on_heat", _DEFAULT_SETTINGS.pause_on_heat)
    max_temperature = root.number("max_temperature_c", _DEFAULT_SETTINGS.max_temperature_c)
    snooze_until = root.moment("snooze_until")
    root.done()
    return _validated(
        file,
        lambda: Settings(
            enabled=enabled,
            caps=caps,
            schedule=schedule,
            idle_after=idle_after,
            evacuate_after=evacuate_after,
            checkpoint_after=checkpoint_after,
            owner_load=owner_load,
            pause_on_battery=pause_on_battery,
            pause_on_heat=pause_on_heat,
            max_temperature_c=max_temperature,
            snooze_until=snooze_until,
        ),
    )


def parse_fleet(data: Mapping[str, object], file: Path) -> FleetPolicy:
    """A fleet policy from parsed TOML; `file` is only named in errors."""
    root = _Table(file, data)
    max_cpu = root.number("max_cpu_percent", _DEFAULT_FLEET.max_cpu_percent)
    max_mib = root.optional_integer("max_memory_mib")
    max_percent = root.optional_number("max_memory_percent")
    blackout = tuple(_blackout(entry) for entry in root.tables("blackout"))
    may_disable = root.boolean("owner_may_disable", _DEFAULT_FLEET.owner_may_disable)
    reason = root.string("reason", _DEFAULT_FLEET.reason)
    root.table("coordinator")  # read by `load_link_config`; checked there
    root.table("migration")  # read by `load_link_config` too
    root.done()
    return _validated(
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


def _validated(file: Path, build: Callable[[], _T]) -> _T:
    """Build a domain object; its range checks become `ConfigError`s."""
    try:
        return build()
    except FieldError as error:
        raise ConfigError(file, error.path, error.reason) from None


def _read_toml(file: Path) -> dict[str, object] | None:
    try:
        raw = file.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as error:
        raise ConfigError(file, "", f"cannot read it: {error.strerror or error}") from None
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(file, "", "is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(file, "", f"is not valid TOML: {error}") from None


def _caps(table: _Table | None, base: Caps) -> Caps:
    if table is None:
        return base
    caps = Caps(
        in_use=_limits(table.table("in_use"), base.in_use),
        idle=_limits(table.table("idle"), base.idle),
    )
    table.done()
    return caps


def _limits(table: _Table | None, base: Limits) -> Limits:
    if table is None:
        return base
    cpu = table.number("cpu_percent", base.cpu_percent)
    mib = table.optional_integer("memory_mib")
    percent = table.optional_number("memory_percent")
    table.done()
    if mib is None and percent is None:
        # The two memory keys form one cap: inherit them together or not at all.
        mib, percent = base.memory_mib, base.memory_percent
    return Limits(cpu_percent=cpu, memory_mib=mib, memory_percent=percent)


def _owner_load(table: _Table | None) -> OwnerLoadLimit:
    if table is None:
        return _DEFAULT_LOAD
    limit = OwnerLoadLimit(
        pause_above_percent=table.number("pause_above_percent", _DEFAULT_LOAD.pause_above_percent),
        pause_after=table.seconds("pause_after", _DEFAULT_LOAD.pause_after),
        resume_below_percent=table.number(
            "resume_below_percent", _DEFAULT_LOAD.resume_below_percent
        ),
        resume_after=table.seconds("resume_after", _DEFAULT_LOAD.resume_after),
    )
    table.done()
    return limit


def _window(table: _Table) -> Window:
    return Window(
        days=table.days("days"),
        start=table.time_of_day("start"),
        end=table.time_of_day("end"),
        label=table.string("label", ""),
    )


def _blackout(table: _Table) -> Window:
    window = _window(table)
    table.done()
    return window


def _donation_window(table: _Table, default_caps: Caps) -> DonationWindow:
    window = _window(table)
    caps_table = table.table("caps")
    entry = DonationWindow(window, None if caps_table is None else _caps(caps_table, default_caps))
    table.done()
    return entry


class _Table:
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
            raise self.error(name, f"must be true or false, got {_shown(value)}")
        return value

    def optional_number(self, name: str) -> float | None:
        value = self._get(name)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.error(name, f"must be a number, got {_shown(value)}")
        return float(value)

    def number(self, name: str, default: float) -> float:
        value = self.optional_number(name)
        return default if value is None else value

    def optional_integer(self, name: str) -> int | None:
        value = self._get(name)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(name, f"must be a whole number, got {_shown(value)}")
        return value

    def string(self, name: str, default: str) -> str:
        value = self._get(name)
        if value is None:
            return default
        if not isinstance(value, str):
            raise self.error(name, f"must be a string, got {_shown(value)}")
        return value

    def seconds(self, name: str, default: timedelta) -> timedelta:
        value = self.optional_number(name)
        if value is None:
            return default
        try:
            return timedelta(seconds=value)
        except (OverflowError, ValueError):
            raise self.error(name, f"must be a number of seconds ≥ 0, got {value:g}") from None

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
        raise self.error(name, f'must be a time of day like "09:00", got {_shown(value)}')

    def days(self, name: str) -> frozenset[Weekday]:
        value = self._required(name)
        if not isinstance(value, list) or not all(
            isinstance(day, str) and day.lower() in _DAY_NAMES for day in value
        ):
            allowed = ", ".join(f'"{day}"' for day in _DAY_NAMES)
            raise self.error(name, f"must be a list of days from {allowed}, got {_shown(value)}")
        return frozenset(_DAY_NAMES[day.lower()] for day in value)

    def moment(self, name: str) -> datetime | None:
        value = self._get(name)
        if value is not None and not isinstance(value, datetime):
            raise self.error(
                name, f"must be a date and time like 2025-01-06T15:00:00+01:00, got {_shown(value)}"
            )
        return value

    def table(self, name: str) -> _Table | None:
        value = self._get(name)
        if value is None:
            return None
        if not isinstance(value, dict):
            raise self.error(name, f"must be a table ([{self.key(name)}]), got {_shown(value)}")
        return _Table(self._file, value, self.key(name))

    def tables(self, name: str) -> list[_Table]:
        value = self._get(name)
        if value is None:
            return []
        if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
            raise self.error(name, f"must be an array of tables ([[{self.key(name)}]])")
        return [
            _Table(self._file, item, f"{self.key(name)}[{index}]")
            for index, item in enumerate(value)
        ]

    def _required(self, name: str) -> object:
        value = self._get(name)
        if value is None:
            raise self.error(name, "is required")
        return value


def _shown(value: object) -> str:
    """A value as the owner wrote it, short."""
    text = repr(value) if not isinstance(value, bool) else str(value).lower()
    return text if len(text) <= 40 else text[:37] + "..."


# --- writing -----------------------------------------------------------------------


def dump_settings(settings: Settings) -> str:
    """`settings` as TOML that `parse_settings` reads back equal (every key written)."""
    root: list[tuple[str, object]] = [
        ("enabled", settings.enabled),
        ("idle_after", settings.idle_after),
        ("evacuate_after", settings.evacuate_after),
        ("checkpoint_after", settings.checkpoint_after),
        ("pause_on_battery", settings.pause_on_battery),
        ("pause_on_heat", settings.pause_on_heat),
        ("max_temperature_c", settings.max_temperature_c),
    ]
    if settings.snooze_until is not None:
        root.append(("snooze_until", settings.snooze_until))
    load = settings.owner_load
    lines = [
        "# donor_app settings; the format is described in donor_app/settings/config.py",
        *_assignments(root),
        "",
        "[owner_load]",
        *_assignments(
            [
                ("pause_above_percent", load.pause_above_percent),
                ("pause_after", load.pause_after),
                ("resume_below_percent", load.resume_below_percent),
                ("resume_after", load.resume_after),
            ]
        ),
        *_caps_lines("caps", settings.caps),
    ]
    for entry in settings.schedule:
        window = entry.window
        lines += [
            "",
            "[[schedule]]",
            *_assignments(
                [
                    ("label", window.label),
                    ("days", [day.name.lower() for day in sorted(window.days)]),
                    ("start", window.start),
                    ("end", window.end),
                ]
            ),
        ]
        if entry.caps is not None:
            lines += _caps_lines("schedule.caps", entry.caps)
    return "\n".join(lines) + "\n"


def save_settings(settings: Settings, file: Path) -> None:
    """Write `settings` to `file` atomically (a crash leaves the old or the new file)."""
    _write_atomically(file, dump_settings(settings))


def _caps_lines(prefix: str, caps: Caps) -> Iterator[str]:
    for situation, limits in (("in_use", caps.in_use), ("idle", caps.idle)):
        yield ""
        yield f"[{prefix}.{situation}]"
        values: list[tuple[str, object]] = [("cpu_percent", limits.cpu_percent)]
        if limits.memory_mib is not None:
            values.append(("memory_mib", limits.memory_mib))
        if limits.memory_percent is not None:
            values.append(("memory_percent", limits.memory_percent))
        yield from _assignments(values)


def _assignments(pairs: list[tuple[str, object]]) -> Iterator[str]:
    for key, value in pairs:
        yield f"{key} = {_toml_value(value)}"


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, timedelta):
        return _toml_seconds(value)
    if isinstance(value, datetime):
        offset = value.utcoffset()
        # TOML offsets have whole minutes; anything finer is written in UTC.
        if offset is None or offset % timedelta(minutes=1):
            value = value.astimezone(UTC)
        return value.isoformat()
    if isinstance(value, time):
        spec = "minutes" if not (value.second or value.microsecond) else "auto"
        return _toml_string(value.isoformat(timespec=spec))
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def _toml_seconds(value: timedelta) -> str:
    if value.microseconds:
        return repr(value.total_seconds())
    return str(value.days * 86_400 + value.seconds)  # exact, unlike total_seconds()


def _toml_string(text: str) -> str:
    escaped = []
    for char in text:
        if char in '"\\':
            escaped.append("\\" + char)
        elif char < " " or char == "\x7f":
            escaped.append(f"\\u{ord(char):04x}")
        else:
            escaped.append(char)
    return '"' + "".join(escaped) + '"'


def _write_atomically(file: Path, text: str) -> None:
    file.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=file.parent, prefix=f".{file.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as stream:
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, file)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    if os.name == "posix":
        # Persist the rename itself, not only the file's content.
        directory = os.open(file.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


# --- the store ---------------------------------------------------------------------


class _Watched(Generic[_T]):
    """One configuration file: the value in force and the file's current error if any.

    On an error the last good value stays; if the file was never good, `fallback(error)`
    is put in force instead. Each distinct error is logged once.
    """

    def __init__(
        self,
        file: Path,
        load: Callable[[Path], _T],
        initial: _T,
        fallback: Callable[[ConfigError], _T],
    ) -> None:
        self.file = file
        self.value = initial
        self.error: ConfigError | None = None
        self._load = load
        self._fallback = fallback
        self._ever_good = False

    def reload(self) -> bool:
        """Read the file again; True if the value in force changed."""
        try:
            value = self._load(self.file)
        except ConfigError as error:
            if self.error is None or str(error) != str(self.error):
                kept = "keeping the last good values" if self._ever_good else "using safe values"
                _log.warning("%s; %s", error, kept)
            self.error = error
            if self._ever_good:
                return False
            value = self._fallback(error)
        else:
            if self.error is not None:
                _log.info("%s is valid again", self.file)
            self.error = None
            self._ever_good = True
        changed, self.value = value != self.value, value
        return changed

    def set(self, value: _T) -> None:
        """Put `value` in force (just written to the file)."""
        self.value = value
        self.error = None
        self._ever_good = True


class SettingsStore:
    """The owner's settings and the fleet policy, as last read from their files.

    Call `reload()` at start and whenever a file may have changed (it does the I/O; the
    constructor does none). A file that becomes invalid leaves its last good values in
    force; its error is logged once (until it changes or the file is fixed) and kept in
    `errors` for the tray. A file invalid from the start gives the defaults for the
    settings, but for the fleet a policy that allows no donating: its bounds are
    unknown, and the owner's machine comes first. Use it from one thread.
    """

    def __init__(self, settings_file: Path, fleet_file: Path) -> None:
        self._settings = _Watched(
            settings_file, load_settings, _DEFAULT_SETTINGS, lambda _: _DEFAULT_SETTINGS
        )
        self._fleet = _Watched(fleet_file, load_fleet, _DEFAULT_FLEET, _fail_closed)

    @property
    def settings(self) -> Settings:
        """The owner's settings (not yet clamped to the fleet's bounds)."""
        return self._settings.value

    @property
    def fleet(self) -> FleetPolicy:
        """The fleet policy in force."""
        return self._fleet.value

    @property
    def errors(self) -> tuple[ConfigError, ...]:
        """The files' current errors (empty when both are valid)."""
        return tuple(w.error for w in (self._settings, self._fleet) if w.error is not None)

    def reload(self) -> bool:
        """Read both files again; True if the settings or the policy in force changed."""
        settings_changed = self._settings.reload()
        fleet_changed = self._fleet.reload()
        return settings_changed or fleet_changed

    def save(self, settings: Settings) -> None:
        """Write the owner's `settings` atomically and put them in force.

        Raises OSError if the file cannot be written (the old settings stay).
        """
        save_settings(settings, self._settings.file)
        self._settings.set(settings)


def _fail_closed(error: ConfigError) -> FleetPolicy:
    return FleetPolicy(
        max_cpu_percent=0.0,
        max_memory_mib=0,
        reason=f"the fleet policy {error.file} is invalid; ask your administrator",
    )


# --- the coordinator link (the fleet file's [coordinator] table) ---------------------------

_HOST_PORT = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):(\d{1,5})$")
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
    table = _Table(file, data).table("migration")
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
            f"{_shown(libvirt_uri)} is not a libvirt URI ({', '.join(_MIGRATION_SCHEMES)})",
        )
    if not migrate_uri.startswith("tcp://") or len(migrate_uri) <= len("tcp://"):
        raise table.error("migrate_uri", f'must be "tcp://HOST[:PORT]", got {_shown(migrate_uri)}')
    return MigrationEndpoint(libvirt_uri, migrate_uri, tls)


def _host_port(table: _Table, name: str, value: str) -> str:
    match = _HOST_PORT.fullmatch(value)
    if match is None or not 0 < int(match.group(2)) <= 65535:
        raise table.error(name, f'must be "host:port", got {_shown(value)}')
    return value


def parse_link_config(data: Mapping[str, object], file: Path) -> LinkConfig | None:
    """The [coordinator] table of a fleet file, None without one. Files it names
    (ca_file, token_file) are read now; a missing one is a ConfigError naming the key."""
    table = _Table(file, data).table("coordinator")
    if table is None:
        return None
    address = _host_port(table, "address", table.string("address", ""))
    host = address.rsplit(":", 1)[0]
    enroll = table.string("enroll_address", f"{host}:{DEFAULT_ENROLL_PORT}")
    enroll = _host_port(table, "enroll_address", enroll)
    ca_pem_text = table.string("ca_pem", "")
    ca_file = table.string("ca_file", "")
    token = table.string("token", "") or None
    token_file_name = table.string("token_file", "")
    table.done()
    if bool(ca_pem_text) == bool(ca_file):
        raise table.error("ca_file", "give either ca_file or ca_pem (the coordinator's CA)")
    ca_pem = ca_pem_text.encode()
    if ca_file:
        try:
            ca_pem = Path(ca_file).read_bytes()
        except OSError as error:
            raise table.error("ca_file", f"cannot read {ca_file}: {error.strerror}") from None
    if b"BEGIN CERTIFICATE" not in ca_pem:
        raise table.error("ca_file" if ca_file else "ca_pem", "is not a PEM certificate")
    token_file = Path(token_file_name) if token_file_name else None
    if token is None and token_file is not None and token_file.exists():
        try:
            token = token_file.read_text().strip() or None
        except OSError as error:
            raise table.error("token_file", f"cannot read it: {error.strerror}") from None
    migration = parse_migration_endpoint(data, file)
    return LinkConfig(address, enroll, ca_pem, token, token_file, migration)


def load_link_config(file: Path) -> LinkConfig | None:
    """The coordinator link from a fleet file (None: no file, or no [coordinator])."""
    data = _read_toml(file)
    return None if data is None else parse_link_config(data, file)
