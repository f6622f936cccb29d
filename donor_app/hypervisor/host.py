"""`Hypervisor`: a typed wrapper over one libvirt connection, the guests donor_app runs on
this host — defining, starting and stopping them, pausing and capping them, saving and
moving them, and measuring what they use.

It is the agent's one port to libvirt (a typed method per operation, never a proxy), so
it stays one class; each method only orders the calls of the parts beside it:
`guest_domains` (finding a guest's domain, libvirt errors as `HypervisorError`),
`guest_files` (its directory, boot files and disk overlay), `cpu_caps` (cputune or the
duty cycle), `consoles` (each console file's cap), `save_image` (a checkpoint from another
host, before libvirt reads it), `connect` and `migration`.

Thread safety: libvirt connections may be used from several threads; each part guards
its own small state with a lock.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import libvirt

from donor_app.domain.guest import GuestInfo, GuestState, GuestUsage
from donor_app.domain.vm import DiskBoot, VmSpec
from donor_app.hypervisor import consoles, guest_domains, migration, process, save_image
from donor_app.hypervisor.calls import libvirt_call, state_of_code
from donor_app.hypervisor.connect import open_connection
from donor_app.hypervisor.cpu_caps import CpuCapMode, CpuCaps, check_cpu_percent
from donor_app.hypervisor.errors import HypervisorError
from donor_app.hypervisor.events import LifecycleEvents
from donor_app.hypervisor.guest_domains import GuestDomains
from donor_app.hypervisor.guest_files import GuestFiles
from donor_app.hypervisor.images import ImageCache
from donor_app.hypervisor.probe import choose_virt_type
from donor_app.hypervisor.xml import (
    BootFiles,
    build_domain_xml,
    build_isolated_network_xml,
    network_name,
    saved_guest,
)

log = logging.getLogger(__name__)


class Hypervisor:
    """The guests of one libvirt connection. Make one with `Hypervisor.open()`."""

    def __init__(
        self,
        conn: Any,
        *,
        uri: str,
        images: ImageCache,
        state_dir: Path,
        virt_type: str,
        cpu_cap_mode: CpuCapMode = "auto",
        console_max_bytes: int = consoles.MAX_BYTES,
    ) -> None:
        self._conn = conn
        self.uri = uri
        self.images = images
        self.state_dir = state_dir
        self.virt_type = virt_type
        self._domains = GuestDomains(conn)
        self._files = GuestFiles(state_dir, images)
        self._cpu = CpuCaps(uri, cpu_cap_mode)
        self._lock = threading.Lock()
        self._events: LifecycleEvents | None = None
        self._leaving: set[str] = set()  # guests being live-migrated away
        self._consoles = consoles.ConsoleCap(self._files, console_max_bytes)

    @classmethod
    def open(
        cls,
        uri: str,
        *,
        images: ImageCache,
        state_dir: Path,
        virt_type: str | None = None,
        cpu_cap_mode: CpuCapMode = "auto",
        console_max_bytes: int = consoles.MAX_BYTES,
    ) -> Hypervisor:
        """Connect to `uri` (e.g. qemu:///system, qemu:///embed?root=DIR, test:///FILE).

        `virt_type` None probes the host (see probe.py). `cpu_cap_mode` "auto" uses
        cputune and falls back to the duty cycle where the driver refuses it.
        `console_max_bytes`: the cap on each guest's console file (consoles.py).
        """
        chosen = choose_virt_type(uri, virt_type)
        conn = open_connection(uri)
        state_dir.mkdir(parents=True, exist_ok=True)
        log.info("libvirt %s opened; domain type %s", uri, chosen)
        return cls(
            conn,
            uri=uri,
            images=images,
            state_dir=state_dir,
            virt_type=chosen,
            cpu_cap_mode=cpu_cap_mode,
            console_max_bytes=console_max_bytes,
        )

    def warm_up(self) -> None:
        """Have libvirt probe QEMU now rather than on the first guest.

        A libvirtd that has never started a guest spends seconds probing the emulator's
        capabilities (3.7 s measured under TCG) the first time one is defined, started or
        arrives by live migration — a first move then missed its 5 s target. Called on
        a helper thread at agent start; failing here only means the first guest pays.
        """
        started = time.monotonic()
        try:
            with libvirt_call("warm up", None):
                self._conn.getDomainCapabilities(None, None, None, self.virt_type, 0)
        except HypervisorError as error:
            log.info("libvirt warm-up failed (the first guest will probe): %s", error)
            return
        log.info("libvirt probed QEMU in %.1f s", time.monotonic() - started)

    # --- names and lookup -------------------------------------------------------------

    @staticmethod
    def domain_name(guest: str) -> str:
        return guest_domains.domain_name(guest)

    @staticmethod
    def guest_name(domain_name: str) -> str | None:
        return guest_domains.guest_name(domain_name)

    def guest_dir(self, guest: str) -> Path:
        return self._files.guest_dir(guest)

    def console_path(self, guest: str) -> Path:
        """The file the guest's serial console is written to."""
        return self._files.console_path(guest)

    def exists(self, guest: str) -> bool:
        """Whether libvirt has this guest now (asks libvirt, not the cache)."""
        return self._domains.exists(guest)

    def list_guests(self) -> list[str]:
        """Names of donor_app's guests on this connection (defined or running), except
        those in a live migration: one arriving (transient until it has arrived) or
        leaving. libvirt holds their state-change lock for the whole move, so any call
        the engine made on them (caps, pause) would wait up to 30 s for it."""
        names = self._domains.names()
        with self._lock:
            leaving = set(self._leaving)
        return [name for name in names if name not in leaving]

    # --- lifecycle --------------------------------------------------------------------

    def define(self, spec: VmSpec) -> None:
        """Define (not start) a guest, and its own network if the spec asks for one.
        Nothing is left behind when this raises."""
        self._domains.forget(spec.name)  # a cached domain of an earlier guest is stale
        if self.exists(spec.name):
            raise HypervisorError("define", spec.name, "a guest with this name already exists")
        self._files.make_guest_dir(spec.name)
        try:
            files = self._files.boot_files(spec)
            xml = build_domain_xml(
                spec,
                domain_name=self.domain_name(spec.name),
                virt_type=self.virt_type,
                files=files,
                console_log=self.console_path(spec.name),
            )
            if spec.network:
                self._ensure_network(spec.name)
            with self._domains.call("define", spec.name):
                self._conn.defineXML(xml)
        except BaseException:
            self._remove_guest_things(spec.name)
            raise

    def create(self, spec: VmSpec) -> None:
        """Define and start a guest; if starting fails it is undefined again."""
        self.define(spec)
        try:
            self.start(spec.name)
        except BaseException:
            self.undefine(spec.name)
            raise

    def start(self, guest: str) -> None:
        """Boot a defined guest (or restore it from its managed save, if it has one)."""
        dom = self._domains.lookup("start", guest)
        with self._domains.call("start", guest):
            dom.create()

    def stop(self, guest: str, timeout_s: float = 10.0) -> None:
        """Ask the guest to power off; destroy it if it has not within `timeout_s`."""
        dom = self._domains.lookup("stop", guest)
        self._cpu.stop_duty(guest)
        if self.state(guest) == GuestState.STOPPED:
            return
        with self._domains.call("stop", guest):
            try:
                dom.shutdown()
            except libvirt.libvirtError:
                log.info("guest %s refused a graceful shutdown; destroying it", guest)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.state(guest) == GuestState.STOPPED:
                return
            time.sleep(0.05)
        self.destroy(guest)

    def destroy(self, guest: str) -> None:
        """Power the guest off at once (its memory state is lost)."""
        dom = self._domains.lookup("destroy", guest)
        self._cpu.stop_duty(guest)
        if self.state(guest) == GuestState.STOPPED:
            return
        with self._domains.call("destroy", guest):
            dom.destroy()

    def undefine(self, guest: str) -> None:
        """Remove the guest entirely: destroyed if running, its managed save, files and
        network too."""
        dom = self._domains.lookup("undefine", guest)
        self.destroy(guest)
        with self._domains.call("undefine", guest):
            try:
                dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE)
            except libvirt.libvirtError as exc:
                if exc.get_error_code() != libvirt.VIR_ERR_NO_SUPPORT:
                    raise
                dom.undefine()
        self._cpu.drop(guest)
        self._domains.forget(guest)
        self._remove_guest_things(guest)

    def state(self, guest: str) -> GuestState:
        """The guest's state; a guest under a duty-cycle cap counts as running."""
        dom = self._domains.lookup("state", guest)
        if self._cpu.cycling(guest):
            return GuestState.RUNNING
        with self._domains.call("state", guest):
            code = dom.state()[0]
        return state_of_code(code)

    def info(self, guest: str) -> GuestInfo:
        dom = self._domains.lookup("info", guest)
        with self._domains.call("info", guest):
            info = dom.info()
        return GuestInfo(vcpus=int(info[3]), max_memory_mib=int(info[1]) // 1024)

    # --- pause and caps ---------------------------------------------------------------

    def suspend(self, guest: str) -> None:
        """Pause every vCPU at once; the guest keeps its memory. Idempotent."""
        dom = self._domains.lookup("suspend", guest)
        self._cpu.stop_duty(guest)
        with self._domains.call("suspend", guest):
            if dom.state()[0] != libvirt.VIR_DOMAIN_PAUSED:
                dom.suspend()

    def resume(self, guest: str) -> None:
        """Let a paused guest run again (under its CPU cap, if it has one). Idempotent."""
        dom = self._domains.lookup("resume", guest)
        with self._domains.call("resume", guest):
            if dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED:
                dom.resume()
        cap = self._cpu.get(guest)
        if 0 < cap < 100 and self._cpu.duty_cycling:
            self._cpu.start_duty(guest, dom, cap)

    def cpu_cap(self, guest: str) -> float:
        """The CPU cap in force (percent of the guest's vCPUs), 100 when uncapped."""
        return self._cpu.get(guest)

    def set_cpu_cap(self, guest: str, percent: float) -> None:
        """Limit the guest to `percent` of each of its vCPUs (0–100).

        0 pauses the guest (no quota can express "nothing"); raising the cap from 0
        resumes it. Uses cputune's vcpu_quota live; where the driver has no cputune
        (qemu:///session, test:///) a suspend/resume duty cycle does the same job.
        """
        percent = check_cpu_percent(percent)
        dom = self._domains.lookup("set_cpu_cap", guest)
        previous = self._cpu.replace(guest, percent)
        if percent == 0:
            self.suspend(guest)
            return
        if previous == 0:
            with self._domains.call("set_cpu_cap", guest):
                if dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED:
                    dom.resume()
        if not self._cpu.duty_cycling and self._cpu.set_quota(guest, dom, percent):
            return
        if percent >= 100:
            self._cpu.stop_duty(guest)
        else:
            with self._domains.call("set_cpu_cap", guest):
                paused = dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED
            if self._cpu.cycling(guest) or not paused:  # a paused guest stays paused
                self._cpu.start_duty(guest, dom, percent)

    def set_memory_cap(self, guest: str, memory_mib: int) -> None:
        """Ask the guest's balloon to shrink (or grow back) to `memory_mib`.

        Returns at once; the guest gives memory back over ~200 ms and only what it has
        free (measured: ~210 ms to reach the target). `usage().memory_mib` shows where
        the balloon stands.
        """
        dom = self._domains.lookup("set_memory_cap", guest)
        with self._domains.call("set_memory_cap", guest):
            max_kib = int(dom.maxMemory())
        max_mib = max_kib // 1024
        if (
            isinstance(memory_mib, bool)
            or not isinstance(memory_mib, int)
            or not 64 <= memory_mib <= max_mib
        ):
            raise ValueError(
                f"memory_mib: {memory_mib!r} is outside the allowed range 64–{max_mib} MiB"
                f" for guest {guest!r}"
            )
        with self._domains.call("set_memory_cap", guest):
            dom.setMemoryFlags(memory_mib * 1024, libvirt.VIR_DOMAIN_AFFECT_LIVE)

    # --- saving state -----------------------------------------------------------------

    def save(self, guest: str, path: Path) -> None:
        """Write the guest's memory and device state to `path`; the guest stops."""
        dom = self._domains.lookup("save", guest)
        self._cpu.stop_duty(guest)
        path.parent.mkdir(parents=True, exist_ok=True)
        with self._domains.call("save", guest):
            dom.save(str(path))

    def restore(self, guest: str, path: Path, *, paused: bool = False) -> None:
        """Bring a guest back from `save()`'s file (refused if the file is another's)."""
        with self._domains.call("restore", guest):
            xml = self._conn.saveImageGetXMLDesc(str(path), 0)
        expected = f"<name>{self.domain_name(guest)}</name>"
        if expected not in xml:
            raise HypervisorError("restore", guest, f"{path} holds another guest's state")
        flags = libvirt.VIR_DOMAIN_SAVE_PAUSED if paused else 0
        with self._domains.call("restore", guest):
            self._conn.restoreFlags(str(path), None, flags)
        cap = self._cpu.get(guest)
        if 0 < cap < 100:
            self.set_cpu_cap(guest, cap)

    def managed_save(self, guest: str) -> None:
        """Save the guest where libvirt keeps it; the next `start()` restores it."""
        dom = self._domains.lookup("managed_save", guest)
        self._cpu.stop_duty(guest)
        with self._domains.call("managed_save", guest):
            dom.managedSave(0)

    def has_managed_save(self, guest: str) -> bool:
        dom = self._domains.lookup("has_managed_save", guest)
        with self._domains.call("has_managed_save", guest):
            return bool(dom.hasManagedSaveImage(0))

    # --- moving guests between hosts --------------------------------------------------

    def prepare_files(self, spec: VmSpec) -> tuple[BootFiles, Path]:
        """This host's files for `spec` (boot files from the image cache, which must hold
        them already, and the console log path), for a guest arriving from another host.

        Creates the guest's directory, and its network if the spec asks for one. Only
        kernel-boot guests move: a disk guest's overlay holds state that a live migration
        here does not copy.
        """
        prepared = self._files.for_arrival(spec)
        if spec.network:
            try:
                self._ensure_network(spec.name)
            except BaseException:
                self._remove_guest_things(spec.name)
                raise
        return prepared

    def migratable_xml(self, guest: str) -> str:
        """The running guest's definition as another host's libvirt accepts it."""
        dom = self._domains.lookup("migratable_xml", guest)
        with self._domains.call("migratable_xml", guest):
            return str(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_MIGRATABLE))

    def disk_overlay(self, guest: str) -> Path | None:
        """The disk guest's private overlay (its disk writes), None for a kernel guest."""
        return self._files.disk_overlay(guest)

    def restore_elsewhere(
        self,
        spec: VmSpec,
        save_path: Path,
        *,
        paused: bool = False,
        disk_overlay: Path | None = None,
    ) -> None:
        """Bring back a guest that another host saved (`save()`) to `save_path`.

        That host may be hostile, so its definition of the guest is not restored: the
        guest is defined here from `spec`, as `define()` would, keeping of the saved
        definition only a few checked values (`xml.saved_guest`: the uuid, the machine
        type, the MAC address, the CPU features under KVM). This definition replaces the
        donor's inside the save image (save_image.py) before libvirt reads the file, and
        is passed to libvirt's restore as well; QEMU then loads the saved state into the
        guest the spec builds, or refuses a state of another guest. `save_path` is
        rewritten so.

        A disk guest needs `disk_overlay`, its overlay as saved with it: checked
        (overlays.py), moved into the guest's directory and pointed at this host's copy of
        the base image (the same content: its sha256 names it). Nothing is left defined,
        and none of the guest's files or network, when this raises.
        """
        self._domains.forget(spec.name)
        if self.exists(spec.name):
            raise HypervisorError("restore", spec.name, "a guest with this name already exists")
        if isinstance(spec.boot, DiskBoot) != (disk_overlay is not None):
            raise HypervisorError(
                "restore",
                spec.name,
                "a disk guest's checkpoint must carry its disk overlay"
                if disk_overlay is None
                else "disk_overlay: given for a guest that boots a kernel, not a disk",
            )
        try:
            image = save_image.read(save_path)
            saved = saved_guest(
                image.xml,
                image.cookie,
                spec=spec,
                domain_name=self.domain_name(spec.name),
                virt_type=self.virt_type,
            )
        except (OSError, ValueError) as exc:
            raise HypervisorError(
                "restore", spec.name, f"{save_path} does not fit this guest: {exc}"
            ) from exc
        self._check_uuid_free(spec.name, saved.uuid)
        try:
            files, console_log = (
                self._files.adopt_overlay(spec, disk_overlay)
                if disk_overlay is not None
                else self._files.for_arrival(spec)
            )
            if spec.network:
                self._ensure_network(spec.name)
            xml = build_domain_xml(
                spec,
                domain_name=self.domain_name(spec.name),
                virt_type=self.virt_type,
                files=files,
                console_log=console_log,
                saved=saved,
            )
            save_image.rewrite(save_path, image, xml)
            self._define_and_restore(spec.name, xml, save_path, paused)
        except (OSError, ValueError) as exc:
            self._remove_guest_things(spec.name)
            raise HypervisorError(
                "restore", spec.name, f"{save_path} does not fit this guest: {exc}"
            ) from exc
        except BaseException:
            self._remove_guest_things(spec.name)
            raise

    def _check_uuid_free(self, guest: str, uuid: str) -> None:
        """A checkpoint may not take the uuid of a domain this libvirt has (the owner's
        own VM, another guest)."""
        try:
            other = self._conn.lookupByUUIDString(uuid)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return
            raise HypervisorError("restore", guest, exc.get_error_message()) from exc
        raise HypervisorError(
            "restore", guest, f"the checkpoint's uuid {uuid} is taken here by {other.name()!r}"
        )

    def _define_and_restore(self, guest: str, xml: str, save_path: Path, paused: bool) -> None:
        with self._domains.call("restore", guest):
            dom = self._conn.defineXML(xml)
        flags = libvirt.VIR_DOMAIN_SAVE_PAUSED if paused else 0
        try:
            with self._domains.call("restore", guest):
                self._conn.restoreFlags(str(save_path), xml, flags)
        except BaseException:
            self._domains.forget(guest)
            try:
                if dom.isActive():  # a restore that failed late may have left QEMU up
                    dom.destroy()
                dom.undefine()
            except libvirt.libvirtError as exc:
                log.warning("could not undefine %s after a failed restore: %s", guest, exc)
            raise

    def arrived(self, guest: str) -> bool:
        """False while the guest is still arriving here by live migration.

        During an incoming migration libvirt shows the guest paused and transient, and
        the source still runs it; libvirt makes it persistent (PERSIST_DEST) only once
        the move is done. Guests defined here are persistent from the start.
        """
        dom = self._domains.lookup("arrived", guest)
        with self._domains.call("arrived", guest):
            if not dom.isPersistent():
                return False
            stats = dom.jobStats(0) if dom.isActive() else {}
        return bool(stats.get("operation") != libvirt.VIR_DOMAIN_JOB_OPERATION_MIGRATION_IN)

    def migrate_live(
        self,
        guest: str,
        target: migration.MigrationTarget,
        options: migration.MigrationOptions,
        progress: Callable[[migration.MigrationProgress], None] | None = None,
    ) -> migration.MigrationOutcome:
        """Move the guest to another host's libvirt (migration.py): live, while it runs,
        except under TCG on a QEMU that loses writes in a live move, where it is paused
        for the copy.

        On success the guest is gone from this host (undefined, its files removed). On
        MigrationError it is still here, running if it was (see `source_state`).
        """
        dom = self._domains.lookup("migrate", guest)
        # A duty cycle's suspend/resume would fight the pause libvirt takes at the end.
        self._cpu.stop_duty(guest)
        with self._lock:
            self._leaving.add(guest)
        try:
            outcome = migration.migrate_live(dom, guest, target, options, progress)
        except migration.MigrationError:
            self._cpu.restart_duty(guest, dom)
            raise
        finally:
            with self._lock:
                self._leaving.discard(guest)
        self._cpu.drop(guest)
        self._domains.forget(guest)
        self._remove_guest_things(guest)
        return outcome

    # --- usage ------------------------------------------------------------------------

    def usage(self, guest: str) -> GuestUsage:
        """CPU seconds used so far and memory now (the balloon's current size)."""
        dom = self._domains.lookup("usage", guest)
        with self._domains.call("usage", guest):
            info = dom.info()
            stats: dict[str, int] = dom.memoryStats() if dom.isActive() else {}
        memory_mib = stats.get("actual", info[2]) / 1024
        ref = self._domains.qemu_process(guest, dom)
        measured = process.process_usage(ref) if ref is not None else None
        if measured is None:
            # No QEMU process (test:/// driver, or not running): libvirt's own counter.
            return GuestUsage(info[4] / 1e9, memory_mib, None, None)
        assert ref is not None
        return GuestUsage(measured.cpu_seconds, memory_mib, measured.rss_mib, ref.pid)

    def guest_pids(self) -> list[int]:
        """PIDs of the running guests' QEMU processes (for the owner-load sensor)."""
        pids = []
        for guest in self.list_guests():
            try:
                dom = self._domains.lookup("usage", guest)
                ref = self._domains.qemu_process(guest, dom)
            except HypervisorError:
                continue  # it vanished between list and lookup
            if ref is not None:
                pids.append(ref.pid)
        return pids

    # --- events, networks, shutdown ---------------------------------------------------

    def subscribe_events(self) -> LifecycleEvents:
        """Start delivering lifecycle events of our guests to `LifecycleEvents.queue`."""
        if self._events is None:

            def muted(guest: str, kind: str) -> bool:
                return self._cpu.cycling(guest) and kind in ("suspended", "resumed")

            with libvirt_call("subscribe_events", None):
                self._events = LifecycleEvents(self._conn, self.guest_name, muted)
        return self._events

    def _ensure_network(self, guest: str) -> None:
        """Define and start the guest's own isolated network (xml.py), unless it has one."""
        name = network_name(guest)
        with libvirt_call("network", guest):
            try:
                net = self._conn.networkLookupByName(name)
            except libvirt.libvirtError as exc:
                if exc.get_error_code() != libvirt.VIR_ERR_NO_NETWORK:
                    raise
                net = self._conn.networkDefineXML(build_isolated_network_xml(guest))
            if not net.isActive():
                net.create()
            # Back with the host: a guest the agent starts after a reboot finds it.
            net.setAutostart(1)

    def _remove_network(self, guest: str) -> None:
        """Stop and undefine the guest's network, if it has one."""
        with libvirt_call("network", guest):
            try:
                net = self._conn.networkLookupByName(network_name(guest))
            except libvirt.libvirtError as exc:
                # No such network, or a driver without networks (an embedded one).
                if exc.get_error_code() in (libvirt.VIR_ERR_NO_NETWORK, libvirt.VIR_ERR_NO_SUPPORT):
                    return
                raise
            if net.isActive():
                net.destroy()
            net.undefine()

    def _remove_guest_things(self, guest: str) -> None:
        """What this host keeps for a guest besides its domain: its files and network."""
        try:
            self._remove_network(guest)
        finally:
            self._files.remove(guest)

    def close(self) -> None:
        """Stop duty cycles and the console cap (guests keep running) and close the
        connection."""
        self._cpu.stop_all()
        self._consoles.close()
        if self._events is not None:
            self._events.close()
            self._events = None
        with libvirt_call("close", None):
            self._conn.close()
