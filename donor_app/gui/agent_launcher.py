"""Finding the agent, and starting a user-level one when none answers.

The tray looks for an agent on the given socket, or else on the system agent's socket
and then the user's; if none answers it starts `donor-agent --user-agent` with this same
interpreter (so a virtualenv's tray starts that virtualenv's agent), in its own session
so that quitting the tray leaves the guests running. Qt-free.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from donor_app.agent.local_client import AgentClient, AgentUnavailable

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 1.0


def agent_answers(socket: Path, timeout_s: float = PROBE_TIMEOUT_S) -> bool:
    """True if an agent serves its status on `socket` now."""
    if not socket.exists():
        return False
    with AgentClient(socket, timeout_s=timeout_s) as client:
        try:
            client.status()
        except AgentUnavailable:
            return False
        except ValueError:
            return True  # an agent answers, even if this tray cannot read it
    return True


def choose_socket(candidates: Sequence[Path]) -> Path | None:
    """The first of `candidates` with an agent answering, else None."""
    for socket in candidates:
        if agent_answers(socket):
            return socket
    return None


def user_agent_command(socket: Path, extra_args: Sequence[str]) -> list[str]:
    """The command line of a user-level agent on `socket` (this interpreter's)."""
    return [
        sys.executable,
        "-m",
        "donor_app.cli",
        "--user-agent",
        "--socket",
        str(socket),
        *extra_args,
    ]


@dataclass
class StartedAgent:
    """A user-level agent this tray started; `log_file` holds its output."""

    process: subprocess.Popen[bytes]
    log_file: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def exited(self) -> int | None:
        """Its exit code once it has ended (e.g. libvirt missing), else None."""
        return self.process.poll()

    def log_tail(self, lines: int = 5) -> str:
        try:
            text = self.log_file.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.strip().splitlines()[-lines:])


def start_user_agent(socket: Path, extra_args: Sequence[str], log_file: Path) -> StartedAgent:
    """Start a user-level agent serving `socket`; returns at once (it binds the socket
    when ready, which the status watcher notices). Raises OSError if it cannot start."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    command = user_agent_command(socket, extra_args)
    log.info("no agent answers on %s; starting one: %s (log: %s)", socket, command, log_file)
    with log_file.open("ab") as output:
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            # Its own session: a Ctrl-C or a hang-up aimed at the tray does not reach it.
            start_new_session=os.name == "posix",
        )
    return StartedAgent(process, log_file)
