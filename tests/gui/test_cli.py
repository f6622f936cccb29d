"""`donor-app` as a process: its options, one instance per user, and starting a
user-level agent when none answers (offscreen Qt, a real donor-agent on test:///)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil
import pytest

from donor_app.gui.agent_launcher import agent_answers
from donor_app.gui.single_instance import AlreadyRunning, InstanceLock
from tests.waiting import wait_for


def test_help_lists_the_options() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "donor_app.gui", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    for option in ("--socket", "--no-start-agent", "--agent-arg", "--no-input", "--log-level"):
        assert option in result.stdout


def test_the_lock_is_exclusive_and_released(tmp_path: Path) -> None:
    path = tmp_path / "run" / "donor-app.lock"
    first = InstanceLock(path)
    first.acquire()
    with pytest.raises(
        AlreadyRunning, match=f"already running for this user \\(pid {os.getpid()}\\)"
    ):
        InstanceLock(path).acquire()
    first.release()
    second = InstanceLock(path)
    second.acquire()
    second.release()


def test_a_killed_holder_does_not_block_the_next_tray(tmp_path: Path) -> None:
    path = tmp_path / "donor-app.lock"
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, pathlib; from donor_app.gui.single_instance import InstanceLock; "
         f"lock = InstanceLock(pathlib.Path({str(path)!r})); lock.acquire(); "
         "print('held', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None
        line = holder.stdout.readline()
        assert line == "held\n", line
        with pytest.raises(AlreadyRunning, match=f"pid {holder.pid}"):
            InstanceLock(path).acquire()
    finally:
        holder.kill()
        holder.wait()
    lock = InstanceLock(path)
    lock.acquire()
    lock.release()


def _env(root: Path) -> dict[str, str]:
    # As a login session has it: a private runtime dir (else platformdirs falls back).
    (root / "xdg-run").mkdir(mode=0o700, exist_ok=True)
    env = dict(os.environ)
    env.update(
        HOME=str(root / "home"),
        XDG_RUNTIME_DIR=str(root / "xdg-run"),
        XDG_DATA_HOME=str(root / "xdg-data"),
        XDG_CONFIG_HOME=str(root / "xdg-config"),
        QT_QPA_PLATFORM="offscreen",
        DBUS_SESSION_BUS_ADDRESS="disabled:",
    )
    env.pop("DISPLAY", None)
    return env


def test_with_no_agent_the_tray_starts_one_that_outlives_it() -> None:
    # A short path: the agent's socket lives under it (Unix socket paths ≤ 108 bytes).
    root = Path(tempfile.mkdtemp(prefix="dc-", dir="/tmp"))
    node = root / "node.xml"
    node.write_text("<node/>\n")
    socket = root / "a.sock"
    agent_args = [
        f"--agent-arg={arg}"
        for arg in (
            "--libvirt-uri", f"test://{node}", "--config", str(root / "settings.toml"),
            "--fleet-config", str(root / "fleet.toml"), "--data-dir", str(root / "data"),
            "--cache-dir", str(root / "cache"), "--watch-input", "off",
        )
    ]  # fmt: skip
    command = [sys.executable, "-m", "donor_app.gui", "--socket", str(socket), *agent_args]
    log = root / "tray.log"
    with log.open("wb") as output:
        tray = subprocess.Popen(command, env=_env(root), stdout=output, stderr=subprocess.STDOUT)
    agent_pid = None
    try:
        wait_for(lambda: agent_answers(socket) or tray.poll() is not None, 60, "the agent")
        assert tray.poll() is None, log.read_text()
        children = psutil.Process(tray.pid).children()
        (agent,) = [c for c in children if "--user-agent" in c.cmdline()]
        agent_pid = agent.pid
        wait_for(lambda: "tray state: donating" in log.read_text(), 30, "the tray to connect")
        text = log.read_text()
        assert f"no agent answers on {socket}; starting one" in text

        second = subprocess.run(
            command, env=_env(root), capture_output=True, text=True, timeout=60, check=False
        )
        assert second.returncode == 1
        assert "donor-app is already running for this user" in second.stderr
        assert "Traceback" not in second.stderr

        tray.send_signal(signal.SIGTERM)
        assert tray.wait(timeout=30) == 0
        assert "Traceback" not in log.read_text()
        assert psutil.pid_exists(agent_pid) and agent_answers(socket)
    finally:
        if tray.poll() is None:
            tray.kill()
            tray.wait()
        if agent_pid is not None and psutil.pid_exists(agent_pid):
            os.kill(agent_pid, signal.SIGTERM)
            wait_for(lambda: not _running(agent_pid), 30, "the agent to stop")
        shutil.rmtree(root, ignore_errors=True)


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_autostart_flag_writes_and_removes_the_entry(tmp_path: Path) -> None:
    home = tmp_path
    env = _env(home)
    entry = home / "xdg-config" / "autostart" / "donor-app.desktop"
    subprocess.run(
        [sys.executable, "-m", "donor_app.gui", "--autostart", "on"], env=env, check=True
    )
    assert "Exec=" in entry.read_text()
    subprocess.run(
        [sys.executable, "-m", "donor_app.gui", "--autostart", "off"], env=env, check=True
    )
    assert not entry.exists()
