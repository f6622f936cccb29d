"""Putting the agent together: paths, libvirt, sensors, engine, local API, history.

`run_agent()` blocks until `stop` is set (the CLI sets it on SIGTERM/SIGINT), then stops
cleanly: the guests are left paused (not lost), the socket removed, history flushed.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from donor_app.activity.factory import make_host_sensor, make_idle_counter, make_input_listener
from donor_app.activity.ports import InputListener
from donor_app.agent.engine import Engine
from donor_app.agent.history import History
from donor_app.agent.history_file import HistoryError
from donor_app.agent.link.connection import CoordinatorLink
from donor_app.agent.link.journal import MoveJournal
from donor_app.agent.link.workloads import FleetWorkloads
from donor_app.agent.local_api import LocalApiServer
from donor_app.domain.guest import GuestState
from donor_app.domain.status import AgentStatus
from donor_app.domain.vm import KernelBoot, VmSpec
from donor_app.hypervisor.host import Hypervisor
from donor_app.hypervisor.images import ImageCache
from donor_app.settings.config import ConfigError, LinkConfig, SettingsStore, load_link_config
from donor_app.settings.paths import Paths
from donor_app.settings.secrets import CredentialStore

log = logging.getLogger(__name__)

DEMO_GUEST = "demo"


@dataclass(frozen=True)
class AgentOptions:
    paths: Paths
    libvirt_uri: str
    socket: Path
    settings_file: Path
    fleet_file: Path
    socket_owner_uid: int | None = None
    watch_input: str = "auto"  # auto: when this process can see a display
    virt_type: str | None = None
    demo_kernel: Path | None = None
    demo_initrd: Path | None = None
    demo_mode: str = "burn"
    demo_guests: int = 1
    tick_s: float = 1.0
    user_agent: bool = False
    # The coordinator to join; None: read the fleet file's [coordinator] table.
    link_config: LinkConfig | None = None


def default_libvirt_uri(paths: Paths) -> str:
    """qemu:///system where a system libvirtd runs; else an embedded driver (root) or
    the user's session driver."""
    if os.geteuid() != 0:
        return "qemu:///session"
    if Path("/run/libvirt/libvirt-sock").exists():
        return "qemu:///system"
    return f"qemu:///embed?root={paths.data_dir / 'libvirt'}"


def ensure_demo_guest(
    hv: Hypervisor, kernel: Path, initrd: Path, mode: str, name: str = DEMO_GUEST
) -> None:
    """Define and start a tiny demo guest unless it already exists."""
    kernel_sha = hv.images.add_file(kernel)
    initrd_sha = hv.images.add_file(initrd)
    if not hv.exists(name):
        cmdline = f"console=ttyS0 quiet donor.mode={mode} donor.interval_ms=50"
        spec = VmSpec(name, 1, 256, KernelBoot(kernel_sha, initrd_sha, cmdline))
        hv.create(spec)
        log.info("demo guest %s started; its console: %s", name, hv.console_path(name))
    elif hv.state(name) is GuestState.STOPPED and not hv.has_managed_save(name):
        hv.start(name)


def _input_listener(mode: str) -> InputListener | None:
    if mode == "off" or (mode == "auto" and not os.environ.get("DISPLAY")):
        return None
    return make_input_listener()


def _prepare_dirs(paths: Paths) -> None:
    for directory in (paths.data_dir, paths.cache_dir):
        directory.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        # QEMU runs as the libvirt-qemu user and must reach the images and consoles.
        for directory in (paths.data_dir, paths.cache_dir):
            directory.chmod(0o755)


def run_agent(
    options: AgentOptions,
    stop: threading.Event,
    on_status: Callable[[AgentStatus], None] | None = None,
) -> None:
    """Run until `stop` is set. `on_status` is called on a helper thread per snapshot."""
    paths = options.paths
    _prepare_dirs(paths)
    images = ImageCache(paths.cache_dir / "images")
    hv = Hypervisor.open(
        options.libvirt_uri,
        images=images,
        state_dir=paths.data_dir / "guests-state",
        virt_type=options.virt_type,
    )
    threading.Thread(target=hv.warm_up, name="libvirt-warm-up", daemon=True).start()
    try:
        history = History.open(paths.data_dir / "history.sqlite3")
    except HistoryError as exc:
        log.error("%s; keeping history in memory until the agent restarts", exc)
        history = History.in_memory()
    engine: Engine | None = None
    api: LocalApiServer | None = None
    coordinator: CoordinatorLink | None = None
    try:
        if options.demo_kernel and options.demo_initrd:
            for number in range(1, options.demo_guests + 1):
                name = DEMO_GUEST if number == 1 else f"{DEMO_GUEST}-{number}"
                ensure_demo_guest(
                    hv, options.demo_kernel, options.demo_initrd, options.demo_mode, name
                )
        engine = Engine(
            hv,
            SettingsStore(options.settings_file, options.fleet_file),
            make_host_sensor(hv.guest_pids),
            idle_counter=make_idle_counter(),
            input_listener=_input_listener(options.watch_input),
            history=history,
            tick_s=options.tick_s,
            user_agent=options.user_agent,
        )
        engine.start()
        api = LocalApiServer(engine, history, options.socket, owner_uid=options.socket_owner_uid)
        api.start()
        coordinator = _start_link(options, hv, engine)
        if on_status is not None:
            _follow(engine, stop, on_status)
        stop.wait()
        log.info("stopping: guests are left paused")
    finally:
        if coordinator is not None:
            coordinator.stop()
        if api is not None:
            api.stop()
        if engine is not None:
            engine.stop(pause_guests=True)
        history.close()
        hv.close()


def _link_config(options: AgentOptions) -> LinkConfig | None:
    if options.link_config is not None:
        return options.link_config
    try:
        return load_link_config(options.fleet_file)
    except ConfigError as error:
        # The owner stays protected; only the fleet link is off until the file is fixed.
        log.error("%s; not joining a coordinator", error)
        return None


def _start_link(options: AgentOptions, hv: Hypervisor, engine: Engine) -> CoordinatorLink | None:
    config = _link_config(options)
    if config is None:
        log.info("no coordinator configured: donating to local guests only")
        return None
    data = options.paths.data_dir
    journal = MoveJournal(data / "fleet-moves.json", on_change=engine.set_moves)
    engine.set_moves(journal.recent())  # the moves from before a restart, shown at once
    workloads = FleetWorkloads(
        hv, data / "fleet-workloads.json", engine.call, config.migration, journal=journal
    )
    link = CoordinatorLink(
        config,
        CredentialStore(options.paths.data_dir),
        workloads,
        status=engine.status,
        set_link_status=engine.set_link_status,
        hold_paused=engine.hold_paused,
    )
    link.start()
    return link


def _follow(
    engine: Engine, stop: threading.Event, on_status: Callable[[AgentStatus], None]
) -> None:
    watcher = engine.watch()

    def loop() -> None:
        while not stop.is_set():
            try:
                on_status(watcher.get(timeout=0.5))
            except queue.Empty:
                continue

    threading.Thread(target=loop, name="status-line", daemon=True).start()
