"""Building the installers for tests, cached by a hash of everything that goes in.

A fresh CI machine builds each once per run; a developer's repeated runs reuse them
until pyproject.toml, donor_app/ or installer/ change.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

from tests.installer.debroot import _locked, cache_dir

REPO = Path(__file__).resolve().parents[2]
INSTALLER = REPO / "installer"


def sources_key() -> str:
    """A content hash of pyproject.toml, donor_app/ and installer/."""
    digest = hashlib.sha256()
    files = [REPO / "pyproject.toml"]
    for top in (REPO / "donor_app", INSTALLER):
        files += sorted(p for p in top.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    for path in files:
        digest.update(str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def _build(kind: str, version: str, command: list[str], name: str) -> Path:
    out = cache_dir() / "builds" / sources_key()
    target = out / name
    with _locked(cache_dir() / "build.lock"):
        if not target.exists():
            env = dict(os.environ, DONOR_PAYLOAD_CACHE=str(cache_dir() / "payload"))
            done = subprocess.run(
                [*command, "--version", version, "--out", str(out)],
                cwd=REPO,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                check=False,
            )
            if done.returncode != 0:
                raise AssertionError(f"building the {kind} failed:\n{done.stdout.decode()}")
    return target


def deb(version: str, compress: str = "gzip") -> Path:
    """donor-app_<version>_amd64.deb (gzip: quicker to build than the release's xz;
    "none" quicker still, for packages that only test the maintainer scripts)."""
    return _build(
        "deb",
        version,
        [str(INSTALLER / "build-deb"), "--compress", compress],
        f"donor-app_{version}_amd64.deb",
    )


def tarball(version: str) -> Path:
    """donor-app_<version>_linux-amd64.tar.gz, for install.sh."""
    return _build(
        "tarball",
        version,
        [str(INSTALLER / "build-tarball")],
        f"donor-app_{version}_linux-amd64.tar.gz",
    )
