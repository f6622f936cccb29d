"""Fixtures for the installer tests: a fresh Debian root per test, the built packages,
a coordinator, and the admin's install media (a fleet config + CA) inside the root."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.coordinator_helpers import RunningCoordinator
from tests.installer import packages
from tests.installer.debroot import DebRoot, deb_root

VERSION = "0.1.0"
UPGRADE_VERSION = "0.1.0+upgrade1"


def needs_root_tools() -> pytest.MarkDecorator:
    """Chroots, mounts and debootstrap need root (CI runs as root)."""
    missing = [tool for tool in ("debootstrap", "dpkg-deb", "unshare") if not shutil.which(tool)]
    return pytest.mark.skipif(
        os.geteuid() != 0 or bool(missing),
        reason=f"needs root and {missing or 'debootstrap, dpkg-deb, unshare'}"
        " (scripts/bootstrap installs them)",
    )


@pytest.fixture(scope="session")
def deb() -> Path:
    return packages.deb(VERSION)


@pytest.fixture(scope="session")
def upgrade_deb() -> Path:
    # Uncompressed: the same tree as `deb` (compressed, so that is covered), built in
    # seconds instead of half a minute.
    return packages.deb(UPGRADE_VERSION, compress="none")


@pytest.fixture
def root(tmp_path: Path) -> Iterator[DebRoot]:
    with deb_root(tmp_path / "deb-root") as fresh:
        yield fresh


@dataclass
class Media:
    """What an admin hands the installer, as paths inside the root."""

    root: DebRoot

    def put(self, name: str, content: str | bytes) -> str:
        path = f"/srv/media/{name}"
        host = self.root.host(path)
        host.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            host.write_bytes(content)
        else:
            host.write_text(content)
        return path


@pytest.fixture
def media(root: DebRoot) -> Media:
    return Media(root)


def fleet_toml(address: str, enroll_address: str, ca_file: str, token: str | None) -> str:
    """An admin's fleet config: a policy and the coordinator to join."""
    token_line = f'token = "{token}"\n' if token else ""
    return (
        'reason = "IT policy: installer test fleet"\n'
        "max_cpu_percent = 50\n"
        "owner_may_disable = false\n"
        "\n[[blackout]]\n"
        'label = "nightly backups"\n'
        'days = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]\n'
        'start = "01:00"\n'
        'end = "03:00"\n'
        "\n[coordinator]\n"
        f'address = "{address}"\n'
        f'enroll_address = "{enroll_address}"\n'
        f'ca_file = "{ca_file}"\n' + token_line
    )


def fleet_for(coordinator: RunningCoordinator, media: Media, token: str | None) -> str:
    """Put the coordinator's CA and a fleet config naming it on the media; its path."""
    ca = media.put("coordinator-ca.pem", coordinator.ca_pem)
    endpoints = coordinator.endpoints
    return media.put(
        "fleet.toml", fleet_toml(endpoints.address, endpoints.enroll_address, ca, token)
    )


def new_token(coordinator: RunningCoordinator, uses: int = 1) -> str:
    with coordinator.admin() as admin:
        return admin.create_token(ttl_s=3600, uses=uses).token


def connected_donors(coordinator: RunningCoordinator) -> list[str]:
    """The ids of the donors connected to `coordinator` now."""
    with coordinator.admin() as admin:
        return [d.id for d in admin.donors() if d.connected]
