"""Qt tests run offscreen, against a real agent (engine + local API on a temp socket,
libvirt's test:/// driver with one guest), as tests/integration builds it."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pytest

# Before any QApplication exists: no display needed, and Qt must not autolaunch a
# session bus per test (HOST-FACTS, "Desktop").
os.environ["QT_QPA_PLATFORM"] = "offscreen"
os.environ["DBUS_SESSION_BUS_ADDRESS"] = "disabled:"
# Qt's GLib event dispatcher takes GLib's default main context for the main thread;
# libvirt's event loop (GLib-based since libvirt 6.2) runs that same context on its own
# thread and would starve for the rest of the pytest process (the hypervisor contract
# suite's lifecycle events stopped arriving). The product never mixes the two in one
# process: the tray talks to the agent over its socket.
os.environ["QT_NO_GLIB"] = "1"

from donor_app.agent.engine import Engine
from donor_app.agent.history import History
from donor_app.agent.local_api import LocalApiServer
from donor_app.agent.local_client import AgentClient
from donor_app.domain.readings import HostReading
from donor_app.domain.vm import KernelBoot, VmSpec
from donor_app.hypervisor.host import Hypervisor
from donor_app.hypervisor.images import ImageCache
from donor_app.settings.config import SettingsStore


class QuietHost:
    """The owner's machine, idle: a stand-in for the psutil sensor (tested on its own)."""

    def read(self) -> HostReading:
        return HostReading(owner_cpu_percent=1.0, total_memory_mib=16384, cpu_count=4)


@dataclass
class Agent:
    root: Path
    socket: Path
    settings_file: Path
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


MakeAgent = Callable[..., Agent]


@pytest.fixture
def make_agent() -> Iterator[MakeAgent]:
    """`make_agent(settings_toml="", fleet_toml="", history=[(when, cpu_s, gib_h)])`."""
    cleanups: list[Callable[[], None]] = []

    def make(
        settings_toml: str = "idle_after = 1\n",
        fleet_toml: str = "",
        history: list[tuple[datetime, float, float]] = (),  # type: ignore[assignment]
    ) -> Agent:
        # A short path: Unix socket paths are limited to 108 bytes.
        root = Path(tempfile.mkdtemp(prefix="dg-", dir="/tmp"))
        node = root / "node.xml"
        node.write_text("<node/>\n")
        cache = ImageCache(root / "images")
        kernel = root / "kernel"
        kernel.write_bytes(b"test:/// boots nothing")
        hv = Hypervisor.open(f"test://{node}", images=cache, state_dir=root / "state")
        hv.create(VmSpec("g1", 1, 256, KernelBoot(cache.add_file(kernel))))
        settings_file = root / "config" / "settings.toml"
        settings_file.parent.mkdir()
        settings_file.write_text(settings_toml)
        if fleet_toml:
            (root / "fleet.toml").write_text(fleet_toml)
        store = History.open(root / "history.sqlite3")
        for when, cpu_seconds, gib_hours in history:
            store.record(when, "g1", cpu_seconds, gib_hours)
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
        agent = Agent(root, socket, settings_file, engine, store, AgentClient(socket), None)
        agent.start_api()

        def cleanup() -> None:
            agent.client.close()
            agent.stop_api()
            engine.stop()
            store.close()
            hv.close()
            shutil.rmtree(root, ignore_errors=True)

        cleanups.append(cleanup)
        return agent

    yield make
    for cleanup in reversed(cleanups):
        cleanup()


@pytest.fixture
def agent(make_agent: MakeAgent) -> Agent:
    return make_agent()
