"""A real `donor-agent` process with the tiny guest, for end-to-end tests and benchmarks.

Everything lives under one short temporary directory (Unix socket and QEMU monitor paths
must stay under 108 bytes). As root the agent uses its own embedded QEMU driver there.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from donor_app.agent.local_client import AgentClient, AgentUnavailable
from tests.guest.build_guest import build_guest
from tests.guests import qemu_uri, shared_tmp_dir
from tests.waiting import wait_for


@dataclass
class AgentProcess:
    process: subprocess.Popen[bytes]
    client: AgentClient
    root: Path
    log: Path

    @property
    def console(self) -> Path:
        return self.root / "data" / "guests-state" / "guests" / "demo" / "console.log"

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def _ready(client: AgentClient, demo: bool) -> bool:
    try:
        status = client.status()
    except AgentUnavailable:
        return False
    return not demo or any(g.name == "demo" and g.state == "running" for g in status.guests)


@contextmanager
def running_agent(
    settings_toml: str,
    *,
    display: str | None = None,
    extra_args: tuple[str, ...] = (),
    root: Path | None = None,
    libvirt_uri: str | None = None,
    demo: bool = True,
) -> Iterator[AgentProcess]:
    """An agent with `settings_toml` as the owner's settings; with `demo`, a demo guest
    that burns CPU. `root` (kept afterwards) lets a test start an agent again where a
    killed one left its state; by default a fresh one is made and removed. `libvirt_uri`
    (e.g. a test's own libvirtd) replaces the private embedded driver."""
    owned = root is None
    root = shared_tmp_dir(root or Path(tempfile.mkdtemp(prefix="de-", dir="/tmp")))
    (root / "config").mkdir(exist_ok=True)
    (root / "config" / "settings.toml").write_text(settings_toml)
    image = build_guest()
    demo_args = ("--demo-kernel", str(image.kernel), "--demo-initrd", str(image.initrd))
    env = dict(os.environ)
    env.pop("DISPLAY", None)
    if display is not None:
        env["DISPLAY"] = display
    log = root / "agent.log"
    args = [
        sys.executable, "-m", "donor_app.cli",
        "--config", str(root / "config" / "settings.toml"),
        "--fleet-config", str(root / "fleet.toml"),
        "--data-dir", str(root / "data"),
        "--cache-dir", str(root / "cache"),
        "--socket", str(root / "run" / "agent.sock"),
        "--libvirt-uri", libvirt_uri or qemu_uri(root / "libvirt"),
        *(demo_args if demo else ()),
        "--watch-input", "on" if display else "off",
        *extra_args,
    ]  # fmt: skip
    with log.open("ab") as log_file:
        process = subprocess.Popen(
            args, env=env, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
    client = AgentClient(root / "run" / "agent.sock", timeout_s=5)
    agent = AgentProcess(process, client, root, log)
    try:
        wait_for(
            lambda: _ready(client, demo) or process.poll() is not None,
            120,
            "the agent to run its demo guest" if demo else "the agent to answer",
            interval=0.2,
        )
        if process.poll() is not None:
            raise AssertionError(f"donor-agent exited early:\n{agent.log_text()}")
        yield agent
    finally:
        client.close()
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if libvirt_uri is None:
            _kill_guests(root)
        if owned:
            shutil.rmtree(root, ignore_errors=True)


def _kill_guests(root: Path) -> None:
    """The agent leaves guests paused by design; a test run must not leave them behind."""
    for pid_file in (root / "libvirt").rglob("*.pid"):
        try:
            os.kill(int(pid_file.read_text().strip()), signal.SIGKILL)
        except (ValueError, ProcessLookupError, PermissionError):
            continue
