"""A clean Debian root to install packages into, without containers or systemd.

`clean_root()` is a debootstrap minbase of Debian 12 with the package's dependencies
(python3, libvirt0), built once and cached (a few minutes from deb.debian.org). Each test
gets a `DebRoot`: an overlay of that cache with a private upper layer, so every test
starts clean and the upper layer shows exactly what an install changed. Commands run
chrooted in a private mount namespace with its own /proc, /dev and /sys, which vanish
when the command ends; nothing is mounted on the host but the overlay itself.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shlex
import shutil
import subprocess
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
# What `apt install ./donor-app.deb` would pull in (the package's Pre-Depends/Depends).
INCLUDE = ("python3", "libvirt0")
# Parts of a root that change with any dpkg run; "left behind" comparisons skip them.
BOOKKEEPING = ("var/lib/dpkg/", "var/log/", "var/cache/debconf/", "var/cache/ldconfig/")


def cache_dir() -> Path:
    """Where built roots and packages are kept between test runs."""
    override = os.environ.get("DONOR_INSTALLER_TEST_CACHE")
    if override:
        return Path(override)
    if os.geteuid() == 0:
        return Path("/var/cache/donor_app-test")
    return Path.home() / ".cache" / "donor_app-test"


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One builder at a time (parallel test runs share the cache)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def clean_root() -> Path:
    """The cached debootstrap root (built on first use; never modified afterwards)."""
    key = hashlib.sha256(repr((SUITE, MIRROR, INCLUDE, "minbase")).encode()).hexdigest()[:12]
    root = cache_dir() / f"root-{SUITE}-{key}"
    with _locked(cache_dir() / "root.lock"):
        if not (root / "usr/bin/python3").exists():
            building = root.with_name(root.name + ".building")
            shutil.rmtree(building, ignore_errors=True)
            subprocess.run(
                [
                    "debootstrap", "--variant=minbase", f"--include={','.join(INCLUDE)}",
                    SUITE, str(building), MIRROR,
                ],
                check=True,
                stdout=subprocess.DEVNULL,
            )  # fmt: skip
            # apt's downloads are not part of a clean root.
            shutil.rmtree(building / "var/cache/apt/archives", ignore_errors=True)
            (building / "var/cache/apt/archives/partial").mkdir(parents=True)
            building.rename(root)
    return root


@dataclass
class Result:
    returncode: int
    output: str


@dataclass
class DebRoot:
    """An overlay of the clean root at `path`; `upper` holds every change."""

    path: Path
    upper: Path
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def host(self, path: str) -> Path:
        """The host path of `path` (absolute inside the root)."""
        return self.path / path.lstrip("/")

    def command(self, argv: list[str]) -> list[str]:
        """`argv` chrooted, in a mount namespace of its own with /proc, /dev, /sys."""
        root = shlex.quote(str(self.path))
        setup = (
            f"mount -t proc proc {root}/proc && mount --rbind /dev {root}/dev"
            f" && mount -t sysfs -o ro sysfs {root}/sys"
            f' && exec chroot {root} "$@"'
        )
        return ["unshare", "--mount", "--propagation", "private", "sh", "-c", setup, "sh", *argv]

    def run(
        self, argv: list[str], env: Mapping[str, str] | None = None, timeout: float = 300
    ) -> Result:
        """Run `argv` in the root; its stdout and stderr together."""
        done = subprocess.run(
            self.command(argv),
            env=_chroot_env(env),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=timeout,
            check=False,
        )
        return Result(done.returncode, done.stdout.decode(errors="replace"))

    def spawn(self, argv: list[str], log: Path, umask: int = 0o022) -> subprocess.Popen[bytes]:
        """Start `argv` in the root in the background (stopped at teardown)."""
        with log.open("ab") as out:
            process = subprocess.Popen(
                self.command(argv),
                env=_chroot_env(None),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                umask=umask,
            )
        self.processes.append(process)
        return process

    def files(self) -> dict[str, str]:
        """Every path in the root (relative) → its type and mode, e.g. "f 0644"."""
        found: dict[str, str] = {}
        for top, dirs, names in os.walk(self.path):
            rel_top = os.path.relpath(top, self.path)
            if rel_top in ("proc", "sys", "dev"):
                dirs[:] = []
                continue
            for name in dirs + names:
                full = os.path.join(top, name)
                rel = os.path.normpath(os.path.join(rel_top, name))
                st = os.lstat(full)
                kind = "l" if os.path.islink(full) else "d" if os.path.isdir(full) else "f"
                found[rel + ("/" if kind == "d" else "")] = f"{kind} {st.st_mode & 0o7777:04o}"
        return found


def changed(before: Mapping[str, str], after: Mapping[str, str]) -> set[str]:
    """Paths added, removed or with another mode, dpkg's own bookkeeping left out."""
    paths = {p for p in before.keys() | after.keys() if before.get(p) != after.get(p)}
    return {p for p in paths if not p.startswith(BOOKKEEPING)}


def _chroot_env(extra: Mapping[str, str] | None) -> dict[str, str]:
    env = {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "LANG": "C.UTF-8",
        "DEBIAN_FRONTEND": "noninteractive",
        "HOME": "/root",
    }
    env.update(extra or {})
    return env


@contextmanager
def deb_root(work: Path) -> Iterator[DebRoot]:
    """A fresh overlay of the clean root under `work`; unmounted (and its processes
    stopped) on exit."""
    lower = clean_root()
    upper, scratch, merged = work / "upper", work / "overlay-work", work / "root"
    for folder in (upper, scratch, merged):
        folder.mkdir(parents=True)
    subprocess.run(
        [
            "mount", "-t", "overlay", "overlay", "-o",
            f"lowerdir={lower},upperdir={upper},workdir={scratch}", str(merged),
        ],
        check=True,
    )  # fmt: skip
    root = DebRoot(merged, upper)
    try:
        yield root
    finally:
        for process in root.processes:
            if process.poll() is None:
                process.kill()
                process.wait(30)
        subprocess.run(["umount", "--lazy", str(merged)], check=False)


@dataclass(frozen=True)
class Unit:
    """The parts of a systemd unit's [Service] section the tests act on."""

    exec_start: list[str]
    directories: dict[str, int]  # absolute path -> mode, as systemd creates them
    settings: dict[str, str]


def parse_unit(text: str) -> Unit:
    """Read a unit file the way systemd does for the keys used here (one value each;
    later assignments win), and where it would create the service's directories."""
    section, service = "", {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
        elif section == "Service" and "=" in line:
            key, value = line.split("=", 1)
            service[key.strip()] = value.strip()
    bases = {
        "RuntimeDirectory": "/run",
        "StateDirectory": "/var/lib",
        "CacheDirectory": "/var/cache",
        "ConfigurationDirectory": "/etc",
    }
    directories = {}
    for key, base in bases.items():
        for name in service.get(key, "").split():
            mode = int(service.get(f"{key}Mode", "0755"), 8)
            directories[f"{base}/{name}"] = mode
    return Unit(shlex.split(service["ExecStart"]), directories, service)


def start_as_unit(
    root: DebRoot, unit_path: str, log: Path, replace: Mapping[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """Start the unit's ExecStart in `root` as systemd would (its directories made with
    their modes, its UMask), options in `replace` given other values (there is no
    libvirtd in the root, so the tests swap --libvirt-uri)."""
    unit = parse_unit(root.host(unit_path).read_text())
    for path, mode in unit.directories.items():
        host = root.host(path)
        host.mkdir(parents=True, exist_ok=True)
        host.chmod(mode)
    argv = list(unit.exec_start)
    for option, value in (replace or {}).items():
        argv[argv.index(option) + 1] = value
    umask = int(unit.settings.get("UMask", "0022"), 8)
    return root.spawn(argv, log, umask=umask)
