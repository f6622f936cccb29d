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


def _ready(client: AgentClient) -> bool:
    try:
        status = client.status()
    except AgentUnavailable:
        return False
    return any(g.name == "demo" and g.state == "running" for g in status.guests)


@contextmanager
def running_agent(
    settings_toml: str,
    *,
    display: str | None = None,
    extra_args: tuple[str, ...] = (),
) -> Iterator[AgentProcess]:
    """An agent whose demo guest burns CPU, with `settings_toml` as the owner's settings."""
    root = shared_tmp_dir(Path(tempfile.mkdtemp(prefix="de-", dir="/tmp")))
    (root / "config").mkdir()
    (root / "config" / "settings.toml").write_text(settings_toml)
    image = build_guest()
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
        "--libvirt-uri", qemu_uri(root / "libvirt"),
        "--demo-kernel", str(image.kernel),
        "--demo-initrd", str(image.initrd),
        "--watch-input", "on" if display else "off",
        *extra_args,
    ]  # fmt: skip
    with log.open("wb") as log_file:
        process = subprocess.Popen(
            args, env=env, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
    client = AgentClient(root / "run" / "agent.sock", timeout_s=5)
    agent = AgentProcess(process, client, root, log)
    try:
        wait_for(
            lambda: _ready(client) or process.poll() is not None,
            120,
            "the agent to run its demo guest",
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
        _kill_guests(root)
        shutil.rmtree(root, ignore_errors=True)


def _kill_guests(root: Path) -> None:
    """The agent leaves guests paused by design; a test run must not leave them behind."""
    for pid_file in (root / "libvirt").rglob("*.pid"):
        try:
            os.kill(int(pid_file.read_text().strip()), signal.SIGKILL)
        except (ValueError, ProcessLookupError, PermissionError):
            continue
