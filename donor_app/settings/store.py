"""`SettingsStore`: the owner's settings and the fleet policy in force, as last read from
their files.

A file that becomes invalid keeps its last good values in force; its error is logged
once and kept for the tray. The store does the file I/O when asked (`reload`, `save`),
never at construction.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Generic, TypeVar

from donor_app.domain.fleet import FleetPolicy
from donor_app.domain.settings import Settings
from donor_app.settings.fleet_file import load_fleet
from donor_app.settings.owner_file import load_settings, save_settings
from donor_app.settings.toml_reader import ConfigError

_log = logging.getLogger(__name__)

_T = TypeVar("_T")

_DEFAULT_SETTINGS = Settings()
_DEFAULT_FLEET = FleetPolicy()


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
        except Exception as failure:  # see _as_config_error
            error = _as_config_error(self.file, failure)
            if self.error is None or str(error) != str(self.error):
                kept = "keeping the last good values" if self._ever_good else "using safe values"
                # A reader's own failure (not a ConfigError) is a bug: log where it was.
                trace = None if failure is error else failure
                _log.warning("%s; %s", error, kept, exc_info=trace)
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


def _as_config_error(file: Path, error: Exception) -> ConfigError:
    """`error` as a `ConfigError`. The readers raise nothing else; should one ever fail
    otherwise, the file still counts as invalid rather than stopping the engine thread
    that reloads it (and with it every decision)."""
    if isinstance(error, ConfigError):
        return error
    return ConfigError(file, "", f"cannot be read ({type(error).__name__}: {error})")


def _fail_closed(error: ConfigError) -> FleetPolicy:
    return FleetPolicy(
        max_cpu_percent=0.0,
        max_memory_mib=0,
        reason=f"the fleet policy {error.file} is invalid; ask your administrator",
    )
