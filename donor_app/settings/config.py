"""The owner's settings and the fleet policy as TOML files: their format, and the names to
import.

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
equal to ``start`` is an error. Durations are 0 to 366 days, ``memory_mib`` at most
64 TiB. ``snooze_until`` lies at most 366 days ahead, as the tray's Snooze sets it, or a
century ahead for "until I resume" (the agent writes both; one already over is fine).

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
("schedule[1].caps.idle.cpu_percent") and what is allowed; so does a file that is not
UTF-8 TOML of at most 1 MiB, and a ``ca_file`` or ``token_file`` that is not a readable
regular file of at most 1 MiB (a missing ``token_file`` only means no token). Nothing
else comes out of the readers, whatever a file holds. `SettingsStore` keeps the last
good values in force while a file is invalid.

The work is done by one module per job: `toml_reader` (reading a file and its tables,
`ConfigError`), `owner_file` (settings.toml), `fleet_file` (fleet.toml, its
[coordinator] and [migration] tables) and `store` (`SettingsStore`).
"""

from __future__ import annotations

from donor_app.settings.fleet_file import (
    DEFAULT_ENROLL_PORT,
    LinkConfig,
    MigrationEndpoint,
    load_fleet,
    load_link_config,
    parse_fleet,
    parse_link_config,
    parse_migration_endpoint,
)
from donor_app.settings.owner_file import (
    dump_settings,
    load_settings,
    parse_settings,
    save_settings,
)
from donor_app.settings.store import SettingsStore
from donor_app.settings.toml_reader import ConfigError, parse_toml

__all__ = [
    "DEFAULT_ENROLL_PORT",
    "ConfigError",
    "LinkConfig",
    "MigrationEndpoint",
    "SettingsStore",
    "dump_settings",
    "load_fleet",
    "load_link_config",
    "load_settings",
    "parse_fleet",
    "parse_link_config",
    "parse_migration_endpoint",
    "parse_settings",
    "parse_toml",
    "save_settings",
]
