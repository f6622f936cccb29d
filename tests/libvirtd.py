"""A private libvirtd (with its own virtlogd) for tests: two of them make two "donors".

`running_libvirtd(base, name)` starts virtlogd and libvirtd inside `unshare --mount --uts`
with private bind mounts over /etc/libvirt, /run/libvirt, /var/lib/libvirt,
/var/cache/libvirt and /var/log/libvirt, so several daemons run side by side and none
touches the machine's own libvirt. Each has its own `host_uuid` (libvirt refuses to
migrate between daemons that report the same one: "Attempt to migrate guest to the same
host") and hostname, and listens only on a Unix socket in a host-visible directory.

The bind mounts' sources are host-visible directories, so the QEMU pidfiles libvirt
writes under /run/libvirt/qemu can be read from outside: `kill()` uses them to take the
guests down with the daemon, as when a donor machine dies. Only processes in the
daemons' own mount namespace (read from virtlogd once it runs, never our own) or named
by those pidfiles (and checked to be QEMU outside our namespace) are ever signalled.

Needs root and the Debian packages libvirt-daemon-system and qemu-system-x86 (both in
scripts/bootstrap); `unshare` and `mount` come from util-linux, `hostname` from hostname
(both always installed on Debian).
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import psutil

from tests.waiting import wait_for

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 30.0
# Unix socket paths are limited to 107 bytes; the longest we make is
# <root>/run/libvirt-admin-sock. Longer bases get a short directory under /tmp instead.
MAX_ROOT_CHARS = 64
SYSTEM_CONFIG = Path("/etc/libvirt")
# Configuration files copied into the private /etc/libvirt. Not the qemu/ tree: it may
# hold the machine's own domains and the autostarted default network (a second daemon
# would try to create the same bridge).
CONFIG_FILES = ("libvirt.conf", "qemu.conf", "virtlogd.conf")
# (host directory name under the daemon's root, where it is mounted in the namespace)
PRIVATE_DIRS = (
    ("etc", "/etc/libvirt"),
    ("run", "/run/libvirt"),
    ("lib", "/var/lib/libvirt"),
    ("cache", "/var/cache/libvirt"),
    ("log", "/var/log/libvirt"),
)

# Runs inside the new mount and UTS namespaces. Paths come in as arguments, never
# formatted into the script. virtlogd must listen before libvirtd starts a guest
# ("Failed to connect socket to '/run/libvirt/virtlogd-sock'"), hence the wait.
_NAMESPACE_SCRIPT = r"""
set -eu
root=$1
hostname "$2"
while read -r source target; do
    mkdir -p "$target"
    mount --bind "$root/$source" "$target"
done <<EOF
$3
EOF
if [ "$(readlink -f /var/run)" != /run ]; then
    mkdir -p /var/run/libvirt
    mount --bind "$root/run" /var/run/libvirt
fi
virtlogd --pid-file "$root/virtlogd.pid" &
logd=$!
tries=0
until [ -S /run/libvirt/virtlogd-sock ]; do
    kill -0 "$logd" || { echo "virtlogd exited" >&2; exit 1; }
    tries=$((tries + 1))
    [ "$tries" -lt 400 ] || { echo "virtlogd did not listen within 20 s" >&2; exit 1; }
    sleep 0.05
done
exec libvirtd --pid-file "$root/libvirtd.pid"
"""


def _libvirtd_conf(sock_dir: Path, host_uuid: str) -> str:
    # Written between double quotes as they are: _prepare refuses a root holding quotes.
    return (
        "# written by tests/libvirtd.py: a private daemon for tests\n"
        "listen_tls = 0\n"
        "listen_tcp = 0\n"
        f'unix_sock_dir = "{sock_dir}"\n'
        'unix_sock_group = "root"\n'
        'unix_sock_rw_perms = "0700"\n'
        'auth_unix_rw = "none"\n'
        'auth_unix_ro = "none"\n'
        f'host_uuid = "{host_uuid}"\n'
        # Warnings and errors go to stderr, i.e. the daemon log this module reads.
        "log_level = 3\n"
    )


class LibvirtDaemon:
    """One private libvirtd. `start()`, `stop()` and `kill()` may be called in any order."""

    def __init__(self, root: Path, name: str) -> None:
        self.root = root
        self.name = name
        self._process: subprocess.Popen[bytes] | None = None
        self._namespace: str | None = None

    @property
    def socket_path(self) -> Path:
        return self.root / "run" / "libvirt-sock"

    @property
    def uri(self) -> str:
        return f"qemu+unix:///system?socket={self.socket_path}"

    @property
    def pid(self) -> int | None:
        """libvirtd's PID while it runs (the namespace shell execs into it)."""
        if self._process is None or self._process.poll() is not None:
            return None
        return self._process.pid

    def _log_path(self) -> Path:
        return self.root / "daemon.log"

    def log_text(self) -> str:
        """The daemons' own output, then every guest's QEMU log."""
        parts = []
        with suppress(FileNotFoundError):
            parts.append(self._log_path().read_text(errors="replace"))
        for qemu_log in sorted((self.root / "log" / "qemu").glob("*.log")):
            parts.append(f"--- {qemu_log.name}\n{qemu_log.read_text(errors='replace')}")
        return "\n".join(parts)

    # --- starting ---------------------------------------------------------------------

    def _prepare(self) -> None:
        if '"' in str(self.root) or "\n" in str(self.root):
            raise ValueError(f"root: {self.root!r} must not contain quotes or newlines")
        for directory, _ in PRIVATE_DIRS:
            (self.root / directory).mkdir(parents=True, exist_ok=True)
        # QEMU (user libvirt-qemu) reaches its files through these directories.
        for path in (self.root, self.root / "lib", self.root / "run"):
            path.chmod(0o755)
        etc = self.root / "etc"
        if (etc / "libvirtd.conf").exists():
            return  # a restart keeps the same configuration (same host_uuid)
        for filename in CONFIG_FILES:
            source = SYSTEM_CONFIG / filename
            if source.exists():
                shutil.copy2(source, etc / filename)
        (etc / "libvirtd.conf").write_text(_libvirtd_conf(self.root / "run", str(uuid.uuid4())))

    def start(self) -> None:
        """Start virtlogd and libvirtd; return once libvirtd accepts connections."""
        if self.pid is not None:
            raise RuntimeError(f"libvirtd {self.name} is already running")
        self._prepare()
        self.socket_path.unlink(missing_ok=True)
        mounts = "\n".join(f"{source} {target}" for source, target in PRIVATE_DIRS)
        with self._log_path().open("ab") as log:
            log.write(f"=== starting libvirtd {self.name} at {time.ctime()}\n".encode())
            log.flush()
            self._process = subprocess.Popen(
                [
                    "unshare", "--mount", "--uts", "--propagation", "private", "--",
                    "sh", "-c", _NAMESPACE_SCRIPT, "libvirtd-ns",
                    str(self.root), f"lv-{self.name}", mounts,
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                # Its own process group: a Ctrl-C in the test runner must not reach it
                # before the fixture has cleaned up.
                start_new_session=True,
            )  # fmt: skip
        try:
            self._wait_until_listening()
        finally:
            # Read even when starting failed: kill() needs it to find a lone virtlogd.
            self._namespace = self._private_namespace()

    def _wait_until_listening(self) -> None:
        process = self._process
        assert process is not None
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _accepts(self.socket_path):
            if process.poll() is not None:
                raise RuntimeError(
                    f"libvirtd {self.name} exited ({process.returncode}) before listening:"
                    f"\n{self.log_text()}"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"libvirtd {self.name} did not listen on {self.socket_path} within"
                    f" {START_TIMEOUT_S} s:\n{self.log_text()}"
                )
            time.sleep(0.05)

    # --- stopping ---------------------------------------------------------------------

    def stop(self) -> None:
        """Stop libvirtd and virtlogd gracefully (SIGTERM); guests keep running."""
        process = self._process
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        # virtlogd last: libvirtd hands it the logs of guests it shuts down.
        for pid in self._virtlogd_pids():
            _signal(pid, signal.SIGTERM)
        _wait_gone(self._virtlogd_pids, f"virtlogd of libvirtd {self.name} to exit")

    def kill(self) -> None:
        """SIGKILL libvirtd, its virtlogd and every QEMU it started: the donor dies."""
        process = self._process
        if process is not None and process.poll() is None:
            process.kill()  # first, so it starts nothing new while the rest go
            process.wait()

        def everything() -> list[int]:
            return sorted(set(self._daemon_pids() + self._virtlogd_pids() + self._qemu_pids()))

        for pid in everything():
            _signal(pid, signal.SIGKILL)
        _wait_gone(everything, f"the processes of libvirtd {self.name} to die")

    def qemu_args(self, domain_name: str) -> list[str]:
        """The command line of the QEMU this daemon runs `domain_name` in (read from
        /proc through libvirt's pidfile, and checked to name the guest); [] if none."""
        for pid in self._pidfile_pids(f"run/qemu/{glob.escape(domain_name)}.pid", "qemu"):
            try:
                args = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
            except OSError:
                continue  # it has just exited
            if f"guest={domain_name}" in (option(args, "-name") or ""):
                return args
        return []

    def _private_namespace(self) -> str | None:
        """The daemons' mount namespace, read after `unshare` (from virtlogd's pidfile:
        libvirtd may have failed to start), or None if it cannot be told apart."""
        for pid in self._virtlogd_pids():
            return _mount_namespace(pid)
        return None

    def _daemon_pids(self) -> list[int]:
        """Processes in the daemon's mount namespace: libvirtd, virtlogd, helpers."""
        namespace = self._namespace
        if namespace is None:
            return []
        pids = [pid for pid in psutil.pids() if _mount_namespace(pid) == namespace]
        if not pids:
            # The namespace is gone and its inode number may be reused by another one.
            self._namespace = None
        return pids

    def _virtlogd_pids(self) -> list[int]:
        return self._pidfile_pids("virtlogd.pid", "virtlogd")

    def _qemu_pids(self) -> list[int]:
        """QEMU processes from libvirt's pidfiles (libvirt gives each QEMU a mount
        namespace of its own, so `_daemon_pids` does not see them)."""
        return self._pidfile_pids("run/qemu/*.pid", "qemu")

    def _pidfile_pids(self, pattern: str, program: str) -> list[int]:
        """Live PIDs named by pidfiles under the root whose program name contains
        `program` and which run in a mount namespace other than ours (a stale pidfile
        may name a PID since reused by an unrelated process)."""
        own = _mount_namespace(os.getpid())
        pids = []
        for pid_file in self.root.glob(pattern):
            try:
                pid = int(pid_file.read_text().strip())
                cmdline = psutil.Process(pid).cmdline()
            except (ValueError, OSError, psutil.Error):
                continue
            namespace = _mount_namespace(pid)
            if cmdline and program in Path(cmdline[0]).name and namespace not in (None, own):
                pids.append(pid)
        return pids


def option(args: list[str], name: str) -> str | None:
    """The value that follows option `name` (e.g. "-cpu") in a command line, if any."""
    try:
        return args[args.index(name) + 1]
    except (ValueError, IndexError):
        return None


def _mount_namespace(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/mnt")
    except OSError:
        return None


def _accepts(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(str(path))
        except OSError:
            return False
    return True


def _signal(pid: int, signum: signal.Signals) -> None:
    with suppress(ProcessLookupError):
        os.kill(pid, signum)


def _wait_gone(pids: Callable[[], list[int]], what: str) -> None:
    wait_for(lambda: not pids(), STOP_TIMEOUT_S, what, interval=0.05)


def _short_root(base: Path, name: str) -> tuple[Path, bool]:
    """Where the daemon lives, and whether this module made (and so removes) it."""
    root = base / name
    if len(str(root)) <= MAX_ROOT_CHARS:
        return root, False
    return Path(tempfile.mkdtemp(prefix=f"lv-{name}-", dir="/tmp")), True


@contextmanager
def running_libvirtd(base: Path, name: str) -> Iterator[LibvirtDaemon]:
    """A started private libvirtd; on exit it and everything it started are gone."""
    root, made_here = _short_root(base, name)
    daemon = LibvirtDaemon(root, name)
    try:
        daemon.start()
        yield daemon
    finally:
        try:
            daemon.stop()
        finally:
            daemon.kill()  # the guests a graceful stop leaves running
            if made_here:
                shutil.rmtree(root, ignore_errors=True)
