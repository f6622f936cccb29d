"""A real agent inside the test's process: engine, history and local API on a Unix socket,
with libvirt's test:/// driver as its hypervisor and one guest, `g1`, defined and running.

Tests talk to it as the tray does, over its socket (`client`), and reach into it where a
test needs to (the engine's level, the hypervisor's guest state). The agent as its own
process with a real QEMU guest is `tests/agent_process.py`.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from donor_app.agent.engine import Engine
from donor_app.agent.history import History
from donor_app.agent.local_api import LocalApiServer
from donor_app.agent.local_client import AgentClient
from donor_app.domain.readings import HostReading
from donor_app.domain.vm import KernelBoot, VmSpec
from donor_app.hypervisor.host import Hypervisor
from donor_app.hypervisor.images import ImageCache
from donor_app.settings.config import SettingsStore

GUEST = "g1"


class QuietHost:
    """The owner's machine, idle: a stand-in for the psutil sensor (tested on its own)."""

    def __init__(self, cpu_count: int = 4) -> None:
        self.cpu_count = cpu_count

    def read(self) -> HostReading:
        return HostReading(owner_cpu_percent=1.0, total_memory_mib=16384, cpu_count=self.cpu_count)


@dataclass
class InProcessAgent:
    root: Path
    socket: Path
    settings_file: Path
    hv: Hypervisor
    engine: Engine
    history: History
    client: AgentClient
    api: LocalApiServer | None

    def stop_api(self) -> None:
        """The agent stops answering (as when it is restarted)."""
        if self.api is not None:
            self.api.stop(grace_s=0)
            self.api = None

    def start_api(self) -> None:
        self.api = LocalApiServer(self.engine, self.history, self.socket)
        self.api.start()


@contextmanager
def in_process_agent(
    settings_toml: str = "idle_after = 1\n",
    fleet_toml: str = "",
    history: Sequence[tuple[datetime, float, float]] = (),
) -> Iterator[InProcessAgent]:
    """An agent with `settings_toml` as the owner's settings file, `fleet_toml` (if any)
    as the fleet config, and `history` rows (when, cpu_seconds, gib_hours) of `g1` already
    recorded. Engine ticks are short (0.1 s) so that decisions show within a test."""
    # A short path: Unix socket paths are limited to 108 bytes.
    root = Path(tempfile.mkdtemp(prefix="da-", dir="/tmp"))
    node = root / "node.xml"
    node.write_text("<node/>\n")
    cache = ImageCache(root / "images")
    kernel = root / "kernel"
    kernel.write_bytes(b"test:/// boots nothing")
    hv = Hypervisor.open(f"test://{node}", images=cache, state_dir=root / "state")
    hv.create(VmSpec(GUEST, 1, 256, KernelBoot(cache.add_file(kernel))))
    settings_file = root / "config" / "settings.toml"
    settings_file.parent.mkdir()
    settings_file.write_text(settings_toml)
    if fleet_toml:
        (root / "fleet.toml").write_text(fleet_toml)
    store = History.open(root / "history.sqlite3")
    for when, cpu_seconds, gib_hours in history:
        store.record(when, GUEST, cpu_seconds, gib_hours)
    engine = Engine(
        hv,
        SettingsStore(settings_file, root / "fleet.toml"),
        QuietHost(),
        history=store,
        tick_s=0.1,
        status_every_s=0.2,
    )
    engine.start()
    socket = root / "run" / "agent.sock"
    agent = InProcessAgent(
        root, socket, settings_file, hv, engine, store, AgentClient(socket), None
    )
    try:
        agent.start_api()
        yield agent
    finally:
        agent.client.close()
        agent.stop_api()
        engine.stop()
        store.close()
        hv.close()
        shutil.rmtree(root, ignore_errors=True)
