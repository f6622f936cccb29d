"""Where donor_app keeps its files.

Nothing here touches the disk: `default_paths()` only computes locations (via
platformdirs), and creating directories is left to whoever writes into them. Tests and
development runs inject their own `Paths` (`paths_under(tmp_path)` or the constructor).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from platformdirs import PlatformDirs

APP_NAME = "donor_app"

SETTINGS_FILE = "settings.toml"
FLEET_FILE = "fleet.toml"
SOCKET_FILE = "agent.sock"


@dataclass(frozen=True, slots=True)
class Paths:
    """The directories donor_app uses; the file locations derive from them.

    `config_dir`: the owner's settings. `site_config_dir`: the administrator's fleet
    policy (read-only for the owner). `data_dir`: state worth keeping (history,
    credentials fallback, checkpoints). `cache_dir`: re-downloadable data (images).
    `runtime_dir`: the agent's local socket.
    """

    config_dir: Path
    site_config_dir: Path
    data_dir: Path
    cache_dir: Path
    runtime_dir: Path

    @property
    def settings_file(self) -> Path:
        """The owner's settings (TOML, see `donor_app.settings.config`)."""
        return self.config_dir / SETTINGS_FILE

    @property
    def fleet_file(self) -> Path:
        """The fleet policy (TOML, see `donor_app.settings.config`)."""
        return self.site_config_dir / FLEET_FILE

    @property
    def socket_file(self) -> Path:
        """The agent's local API socket."""
        return self.runtime_dir / SOCKET_FILE


def default_paths(app_name: str = APP_NAME) -> Paths:
    """The platform's usual locations, e.g. on Linux ~/.config/donor_app,
    /etc/xdg/donor_app, ~/.local/share/donor_app, ~/.cache/donor_app and
    $XDG_RUNTIME_DIR/donor_app."""
    # appauthor=False: no vendor directory level on Windows.
    dirs = PlatformDirs(appname=app_name, appauthor=False)
    return Paths(
        config_dir=dirs.user_config_path,
        site_config_dir=dirs.site_config_path,
        data_dir=dirs.user_data_path,
        cache_dir=dirs.user_cache_path,
        runtime_dir=dirs.user_runtime_path,
    )


def paths_under(root: Path) -> Paths:
    """Every directory under `root` (tests, development runs, portable installs)."""
    return Paths(
        config_dir=root / "config",
        site_config_dir=root / "site-config",
        data_dir=root / "data",
        cache_dir=root / "cache",
        runtime_dir=root / "run",
    )


def system_paths(app_name: str = APP_NAME) -> Paths:
    """Where an agent running as root (a system service) keeps its files.

    A root agent serves the machine, not root's home: and QEMU, running as its own user,
    must be able to reach the images and guest state, which it cannot under /root.
    """
    return Paths(
        config_dir=Path("/etc") / app_name,
        site_config_dir=Path("/etc/xdg") / app_name,
        data_dir=Path("/var/lib") / app_name,
        cache_dir=Path("/var/cache") / app_name,
        runtime_dir=Path("/run") / app_name,
    )
