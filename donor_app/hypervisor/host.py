"""A typed wrapper over one libvirt connection: the guests donor_app runs on this host.

Every libvirt call goes through `_libvirt_call`, which turns `libvirtError` into a
`HypervisorError` naming the operation and the guest. Guests are libvirt domains named
`donor-<name>`, so the owner's own VMs on the same libvirt are never listed or touched.

Thread safety: libvirt connections may be used from several threads; the small amount of
state kept here (caps, duty cyclers, cached QEMU processes) is guarded by one lock.
"""

from __future__ import annotations

import enum
import logging
import math
import shutil
import subprocess
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import libvirt

from donor_app.domain.vm import DiskBoot, KernelBoot, VmSpec
from donor_app.hypervisor import process
from donor_app.hypervisor.dutycycle import DutyCycler
from donor_app.hypervisor.errors import HypervisorError, ImageError
from donor_app.hypervisor.events import LifecycleEvents, ensure_event_loop
from donor_app.hypervisor.images import ImageCache
from donor_app.hypervisor.probe import choose_virt_type
from donor_app.hypervisor.xml import (
    ISOLATED_NETWORK,
    BootFiles,
    build_domain_xml,
    build_isolated_network_xml,
    retarget_domain_xml,
)

if TYPE_CHECKING:
    from donor_app.hypervisor.migration import (
        MigrationOptions,
        MigrationOutcome,
        MigrationProgress,
        MigrationTarget,
    )

log = logging.getLogger(__name__)

DOMAIN_PREFIX = "donor-"
OVERLAY_FILE = "disk.qcow2"  # a disk guest's writes, in its guest directory
CPU_PERIOD_US = 100_000  # cputune vcpu_period: the window the quota is measured over
MIN_QUOTA_US = 1_000  # libvirt refuses smaller vcpu_quota values
CpuCapMode = Literal["auto", "cputune", "duty-cycle"]


class GuestState(enum.Enum):
    RUNNING = "running"
    PAUSED = "paused"
    SHUTOFF = "shutoff"
    CRASHED = "crashed"
    OTHER = "other"


_STATES = {
    libvirt.VIR_DOMAIN_RUNNING: GuestState.RUNNING,
    libvirt.VIR_DOMAIN_BLOCKED: GuestState.RUNNING,
    libvirt.VIR_DOMAIN_PAUSED: GuestState.PAUSED,
    libvirt.VIR_DOMAIN_SHUTDOWN: GuestState.RUNNING,
    libvirt.VIR_DOMAIN_SHUTOFF: GuestState.SHUTOFF,
    libvirt.VIR_DOMAIN_CRASHED: GuestState.CRASHED,
    libvirt.VIR_DOMAIN_PMSUSPENDED: GuestState.PAUSED,
}


def guest_state_of(dom: Any) -> GuestState:
    """A virDomain's state (raises libvirtError when libvirt no longer has it)."""
    return _STATES.get(dom.state()[0], GuestState.OTHER)


@dataclass(frozen=True, slots=True)
class GuestUsage:
    """What a guest uses now. `pid`/`rss_mib` are None where no QEMU process exists."""

    cpu_seconds: float
    memory_mib: float
    rss_mib: float | None
    pid: int | None


@dataclass(frozen=True, slots=True)
class GuestInfo:
    """A guest's size as defined: what caps are divided by."""

    vcpus: int
    max_memory_mib: int


@contextmanager
def _libvirt_call(operation: str, guest: str | None) -> Iterator[None]:
    try:
        yield
    except libvirt.libvirtError as exc:
        code = exc.get_error_code()
        error = HypervisorError(operation, guest, exc.get_error_message() or str(exc), code)
        error.not_found = code == libvirt.VIR_ERR_NO_DOMAIN
        raise error from exc


def _silence_libvirt_stderr(_ctx: object, _err: object) -> None:
    """libvirt prints every error to stderr by default; ours are raised and logged instead."""


def check_cpu_percent(percent: float) -> float:
    if (
        isinstance(percent, bool)
        or not isinstance(percent, int | float)
        or not math.isfinite(percent)
        or not 0 <= percent <= 100
    ):
        raise ValueError(f"cpu_percent: {percent!r} is outside the allowed range 0–100 %")
    return float(percent)


def prepare_embed_root(uri: str) -> None:
    """Give an embedded QEMU driver (qemu:///embed?root=DIR) a config that works alone.

    By default QEMU's output goes through virtlogd, a daemon an embedded driver is meant
    to do without; "file" writes it under the root instead.
    """
    parsed = urllib.parse.urlsplit(uri)
    if parsed.scheme != "qemu" or parsed.path != "/embed":
        return
    roots = urllib.parse.parse_qs(parsed.query).get("root")
    if not roots:
        raise HypervisorError("connect", None, f"{uri}: qemu:///embed needs ?root=DIR")
    config = Path(roots[0]) / "etc" / "qemu.conf"
    if not config.exists():
        config.parent.mkdir(parents=True, exist_ok=True)
        config.write_text(
            '# written by donor_app: no virtlogd for an embedded driver\nstdio_handler = "file"\n'
        )


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
    ) -> None:
        self._conn = conn
        self.uri = uri
        self.images = images
        self.state_dir = state_dir
        self.virt_type = virt_type
        self._cpu_cap_mode: CpuCapMode = cpu_cap_mode
        self._lock = threading.RLock()
        self._caps: dict[str, float] = {}
        self._duty: dict[str, DutyCycler] = {}
        self._processes: dict[str, process.ProcessRef] = {}
        self._domains: dict[str, Any] = {}
        self._events: LifecycleEvents | None = None
        self._leaving: set[str] = set()  # guests being live-migrated away

    @classmethod
    def open(
        cls,
        uri: str,
        *,
        images: ImageCache,
        state_dir: Path,
        virt_type: str | None = None,
        cpu_cap_mode: CpuCapMode = "auto",
    ) -> Hypervisor:
        """Connect to `uri` (e.g. qemu:///system, qemu:///embed?root=DIR, test:///FILE).

        `virt_type` None probes the host (see probe.py). `cpu_cap_mode` "auto" uses
        cputune and falls back to the duty cycle where the driver refuses it.
        """
        ensure_event_loop()  # before the first open: the embedded driver needs it
        prepare_embed_root(uri)
        libvirt.registerErrorHandler(_silence_libvirt_stderr, None)
        chosen = choose_virt_type(uri, virt_type)
        with _libvirt_call("connect", None):
            conn = libvirt.open(uri)
        state_dir.mkdir(parents=True, exist_ok=True)
        log.info("libvirt %s opened; domain type %s", uri, chosen)
        return cls(
            conn,
            uri=uri,
            images=images,
            state_dir=state_dir,
            virt_type=chosen,
            cpu_cap_mode=cpu_cap_mode,
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
            with _libvirt_call("warm up", None):
                self._conn.getDomainCapabilities(None, None, None, self.virt_type, 0)
        except HypervisorError as error:
            log.info("libvirt warm-up failed (the first guest will probe): %s", error)
            return
        log.info("libvirt probed QEMU in %.1f s", time.monotonic() - started)

    # --- names and lookup -------------------------------------------------------------

    @staticmethod
    def domain_name(guest: str) -> str:
        return DOMAIN_PREFIX + guest

    @staticmethod
    def guest_name(domain_name: str) -> str | None:
        return (
            domain_name.removeprefix(DOMAIN_PREFIX)
            if domain_name.startswith(DOMAIN_PREFIX)
            else None
        )

    def _make_guest_dir(self, guest: str) -> Path:
        guest_dir = self.guest_dir(guest)
        guest_dir.mkdir(parents=True, exist_ok=True)
        guest_dir.chmod(0o755)  # QEMU (another user under qemu:///system) writes in it
        return guest_dir

    def guest_dir(self, guest: str) -> Path:
        return self.state_dir / "guests" / guest

    def console_path(self, guest: str) -> Path:
        """The file the guest's serial console is written to."""
        return self.guest_dir(guest) / "console.log"

    def _domain(self, operation: str, guest: str) -> Any:
        """The guest's virDomain, cached: a lookup per call would sit on the pause path."""
        with self._lock:
            dom = self._domains.get(guest)
        if dom is not None:
            return dom
        try:
            dom = self._conn.lookupByName(self.domain_name(guest))
        except libvirt.libvirtError as exc:
            code = exc.get_error_code()
            if code == libvirt.VIR_ERR_NO_DOMAIN:
                error = HypervisorError(
                    operation,
                    guest,
                    "no such guest (never defined here, or already removed)",
                    code,
                )
                error.not_found = True
                raise error from exc
            raise HypervisorError(operation, guest, exc.get_error_message(), code) from exc
        with self._lock:
            self._domains[guest] = dom
        return dom

    @contextmanager
    def _call(self, operation: str, guest: str) -> Iterator[None]:
        """Like `_libvirt_call`, and forgets a cached domain that libvirt no longer has."""
        try:
            with _libvirt_call(operation, guest):
                yield
        except HypervisorError as exc:
            if exc.not_found:
                self._forget(guest)
            raise

    def _forget(self, guest: str) -> None:
        with self._lock:
            self._domains.pop(guest, None)
            self._processes.pop(guest, None)

    def exists(self, guest: str) -> bool:
        """Whether libvirt has this guest now (asks libvirt, not the cache)."""
        self._forget(guest)
        try:
            self._domain("lookup", guest)
        except HypervisorError as exc:
            if exc.not_found:
                return False
            raise
        return True

    def list_guests(self) -> list[str]:
        """Names of donor_app's guests on this connection (defined or running), except
        those in a live migration: one arriving (transient until it has arrived) or
        leaving. libvirt holds their state-change lock for the whole move, so any call
        the engine made on them (caps, pause) would wait up to 30 s for it."""
        with _libvirt_call("list", None):
            domains = self._conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_PERSISTENT)
        with self._lock:
            leaving = set(self._leaving)
        names = (self.guest_name(dom.name()) for dom in domains)
        return sorted(name for name in names if name is not None and name not in leaving)

    # --- lifecycle --------------------------------------------------------------------

    def _boot_files(self, spec: VmSpec) -> BootFiles:
        try:
            if isinstance(spec.boot, KernelBoot):
                initrd = (
                    self.images.path(spec.boot.initrd_sha256) if spec.boot.initrd_sha256 else None
                )
                return BootFiles(kernel=self.images.path(spec.boot.kernel_sha256), initrd=initrd)
            assert isinstance(spec.boot, DiskBoot)
            base = self.images.path(spec.boot.disk_sha256)
        except ImageError as exc:
            raise exc.for_guest(spec.name) from exc
        overlay = self.guest_dir(spec.name) / OVERLAY_FILE
        self._create_overlay(spec.name, base, overlay)
        return BootFiles(disk_overlay=overlay)

    @staticmethod
    def _create_overlay(guest: str, base: Path, overlay: Path) -> None:
        """A private copy-on-write layer: the cached base image is never written to."""
        _run_qemu_img(
            guest, "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(base), str(overlay)
        )

    def define(self, spec: VmSpec) -> None:
        """Define (not start) a guest. Nothing is left behind when this raises."""
        self._forget(spec.name)  # a cached domain of an earlier guest of this name is stale
        if self.exists(spec.name):
            raise HypervisorError("define", spec.name, "a guest with this name already exists")
        guest_dir = self._make_guest_dir(spec.name)
        try:
            files = self._boot_files(spec)
            xml = build_domain_xml(
                spec,
                domain_name=self.domain_name(spec.name),
                virt_type=self.virt_type,
                files=files,
                console_log=self.console_path(spec.name),
            )
            if spec.network:
                self.ensure_isolated_network()
            with self._call("define", spec.name):
                self._conn.defineXML(xml)
        except BaseException:
            shutil.rmtree(guest_dir, ignore_errors=True)
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
        dom = self._domain("start", guest)
        with self._call("start", guest):
            dom.create()

    def stop(self, guest: str, timeout_s: float = 10.0) -> None:
        """Ask the guest to power off; destroy it if it has not within `timeout_s`."""
        dom = self._domain("stop", guest)
        self._stop_duty(guest)
        if self.state(guest) == GuestState.SHUTOFF:
            return
        with self._call("stop", guest):
            try:
                dom.shutdown()
            except libvirt.libvirtError:
                log.info("guest %s refused a graceful shutdown; destroying it", guest)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.state(guest) == GuestState.SHUTOFF:
                return
            time.sleep(0.05)
        self.destroy(guest)

    def destroy(self, guest: str) -> None:
        """Power the guest off at once (its memory state is lost)."""
        dom = self._domain("destroy", guest)
        self._stop_duty(guest)
        if self.state(guest) == GuestState.SHUTOFF:
            return
        with self._call("destroy", guest):
            dom.destroy()

    def undefine(self, guest: str) -> None:
        """Remove the guest entirely: destroyed if running, its managed save and files too."""
        dom = self._domain("undefine", guest)
        self.destroy(guest)
        with self._call("undefine", guest):
            try:
                dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE)
            except libvirt.libvirtError as exc:
                if exc.get_error_code() != libvirt.VIR_ERR_NO_SUPPORT:
                    raise
                dom.undefine()
        with self._lock:
            self._caps.pop(guest, None)
        self._forget(guest)
        shutil.rmtree(self.guest_dir(guest), ignore_errors=True)

    def state(self, guest: str) -> GuestState:
        """The guest's state; a guest under a duty-cycle cap counts as running."""
        dom = self._domain("state", guest)
        with self._lock:
            if guest in self._duty:
                return GuestState.RUNNING
        with self._call("state", guest):
            code = dom.state()[0]
        return _STATES.get(code, GuestState.OTHER)

    def info(self, guest: str) -> GuestInfo:
        dom = self._domain("info", guest)
        with self._call("info", guest):
            info = dom.info()
        return GuestInfo(vcpus=int(info[3]), max_memory_mib=int(info[1]) // 1024)

    # --- pause and caps ---------------------------------------------------------------

    def suspend(self, guest: str) -> None:
        """Pause every vCPU at once; the guest keeps its memory. Idempotent."""
        dom = self._domain("suspend", guest)
        self._stop_duty(guest)
        with self._call("suspend", guest):
            if dom.state()[0] != libvirt.VIR_DOMAIN_PAUSED:
                dom.suspend()

    def resume(self, guest: str) -> None:
        """Let a paused guest run again (under its CPU cap, if it has one). Idempotent."""
        dom = self._domain("resume", guest)
        with self._call("resume", guest):
            if dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED:
                dom.resume()
        with self._lock:
            cap = self._caps.get(guest, 100.0)
        if 0 < cap < 100 and self._cpu_cap_mode == "duty-cycle":
            self._start_duty(guest, dom, cap)

    def cpu_cap(self, guest: str) -> float:
        """The CPU cap in force (percent of the guest's vCPUs), 100 when uncapped."""
        with self._lock:
            return self._caps.get(guest, 100.0)

    def set_cpu_cap(self, guest: str, percent: float) -> None:
        """Limit the guest to `percent` of each of its vCPUs (0–100).

        0 pauses the guest (no quota can express "nothing"); raising the cap from 0
        resumes it. Uses cputune's vcpu_quota live; where the driver has no cputune
        (qemu:///session, test:///) a suspend/resume duty cycle does the same job.
        """
        percent = check_cpu_percent(percent)
        dom = self._domain("set_cpu_cap", guest)
        with self._lock:
            previous = self._caps.get(guest, 100.0)
            self._caps[guest] = percent
        if percent == 0:
            self.suspend(guest)
            return
        if previous == 0:
            with self._call("set_cpu_cap", guest):
                if dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED:
                    dom.resume()
        if self._cpu_cap_mode != "duty-cycle" and self._set_quota(guest, dom, percent):
            return
        if percent >= 100:
            self._stop_duty(guest)
        else:
            with self._call("set_cpu_cap", guest):
                paused = dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED
            with self._lock:
                cycling = guest in self._duty
            if cycling or not paused:  # a paused guest stays paused until resume()
                self._start_duty(guest, dom, percent)

    def _set_quota(self, guest: str, dom: Any, percent: float) -> bool:
        quota = -1 if percent >= 100 else max(MIN_QUOTA_US, round(CPU_PERIOD_US * percent / 100))
        try:
            dom.setSchedulerParametersFlags(
                {"vcpu_period": CPU_PERIOD_US, "vcpu_quota": quota},
                libvirt.VIR_DOMAIN_AFFECT_LIVE,
            )
        except libvirt.libvirtError as exc:
            if self._cpu_cap_mode == "cputune":
                raise HypervisorError(
                    "set_cpu_cap", guest, exc.get_error_message(), exc.get_error_code()
                ) from exc
            log.info(
                "cputune unavailable on %s (%s): capping CPU with a suspend/resume duty cycle",
                self.uri,
                exc.get_error_message(),
            )
            self._cpu_cap_mode = "duty-cycle"
            return False
        return True

    def _start_duty(self, guest: str, dom: Any, percent: float) -> None:
        with self._lock:
            cycler = self._duty.get(guest)
            if cycler is not None:
                cycler.set_percent(percent)
                return

            def on_error(_exc: Exception) -> None:
                with self._lock:
                    if self._duty.get(guest) is cycler:
                        del self._duty[guest]

            cycler = DutyCycler(guest, dom.suspend, dom.resume, percent, on_error=on_error)
            self._duty[guest] = cycler
        cycler.start()

    def _stop_duty(self, guest: str) -> None:
        with self._lock:
            cycler = self._duty.pop(guest, None)
        if cycler is not None:
            cycler.stop()

    def set_memory_cap(self, guest: str, memory_mib: int) -> None:
        """Ask the guest's balloon to shrink (or grow back) to `memory_mib`.

        Returns at once; the guest gives memory back over ~200 ms and only what it has
        free (HOST-FACTS.md). `usage().memory_mib` shows where the balloon stands.
        """
        dom = self._domain("set_memory_cap", guest)
        with self._call("set_memory_cap", guest):
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
        with self._call("set_memory_cap", guest):
            dom.setMemoryFlags(memory_mib * 1024, libvirt.VIR_DOMAIN_AFFECT_LIVE)

    # --- saving state -----------------------------------------------------------------

    def save(self, guest: str, path: Path) -> None:
        """Write the guest's memory and device state to `path`; the guest stops."""
        dom = self._domain("save", guest)
        self._stop_duty(guest)
        path.parent.mkdir(parents=True, exist_ok=True)
        with self._call("save", guest):
            dom.save(str(path))

    def restore(self, guest: str, path: Path, *, paused: bool = False) -> None:
        """Bring a guest back from `save()`'s file (refused if the file is another's)."""
        with self._call("restore", guest):
            xml = self._conn.saveImageGetXMLDesc(str(path), 0)
        expected = f"<name>{self.domain_name(guest)}</name>"
        if expected not in xml:
            raise HypervisorError("restore", guest, f"{path} holds another guest's state")
        flags = libvirt.VIR_DOMAIN_SAVE_PAUSED if paused else 0
        with self._call("restore", guest):
            self._conn.restoreFlags(str(path), None, flags)
        with self._lock:
            cap = self._caps.get(guest, 100.0)
        if 0 < cap < 100:
            self.set_cpu_cap(guest, cap)

    def managed_save(self, guest: str) -> None:
        """Save the guest where libvirt keeps it; the next `start()` restores it."""
        dom = self._domain("managed_save", guest)
        self._stop_duty(guest)
        with self._call("managed_save", guest):
            dom.managedSave(0)

    def has_managed_save(self, guest: str) -> bool:
        dom = self._domain("has_managed_save", guest)
        with self._call("has_managed_save", guest):
            return bool(dom.hasManagedSaveImage(0))

    # --- moving guests between hosts --------------------------------------------------

    def prepare_files(self, spec: VmSpec) -> tuple[BootFiles, Path]:
        """This host's files for `spec` (boot files from the image cache, which must hold
        them already, and the console log path), for a guest arriving from another host.

        Creates the guest's directory. Only kernel-boot guests move: a disk guest's
        overlay holds state that a live migration here does not copy.
        """
        if isinstance(spec.boot, DiskBoot):
            raise HypervisorError(
                "prepare_files", spec.name, "live migration of disk guests is not supported"
            )
        self._make_guest_dir(spec.name)
        return self._boot_files(spec), self.console_path(spec.name)

    def migratable_xml(self, guest: str) -> str:
        """The running guest's definition as another host's libvirt accepts it."""
        dom = self._domain("migratable_xml", guest)
        with self._call("migratable_xml", guest):
            return str(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_MIGRATABLE))

    def disk_overlay(self, guest: str) -> Path | None:
        """The disk guest's private overlay (its disk writes), None for a kernel guest."""
        overlay = self.guest_dir(guest) / OVERLAY_FILE
        return overlay if overlay.exists() else None

    def restore_elsewhere(
        self,
        spec: VmSpec,
        save_path: Path,
        *,
        paused: bool = False,
        disk_overlay: Path | None = None,
    ) -> None:
        """Bring back a guest that another host saved (`save()`) to `save_path`.

        The save image's definition is rewritten for this host's files, defined here
        persistently (same uuid) and restored. A disk guest needs `disk_overlay`, its
        overlay as saved with it: moved into the guest's directory and pointed at this
        host's copy of the base image (the same content: its sha256 names it). Nothing
        is left defined when this raises.
        """
        self._forget(spec.name)
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
        with self._call("restore", spec.name):
            saved_xml = self._conn.saveImageGetXMLDesc(str(save_path), 0)
        try:
            files, console_log = (
                self._adopt_overlay(spec, disk_overlay)
                if disk_overlay is not None
                else self.prepare_files(spec)
            )
        except BaseException:
            shutil.rmtree(self.guest_dir(spec.name), ignore_errors=True)
            raise
        try:
            xml = retarget_domain_xml(
                saved_xml,
                domain_name=self.domain_name(spec.name),
                files=files,
                console_log=console_log,
            )
            self._define_and_restore(spec.name, xml, save_path, paused)
        except ValueError as exc:
            shutil.rmtree(self.guest_dir(spec.name), ignore_errors=True)
            raise HypervisorError(
                "restore", spec.name, f"{save_path} does not fit this guest: {exc}"
            ) from exc
        except BaseException:
            shutil.rmtree(self.guest_dir(spec.name), ignore_errors=True)
            raise

    def _adopt_overlay(self, spec: VmSpec, overlay: Path) -> tuple[BootFiles, Path]:
        assert isinstance(spec.boot, DiskBoot)
        try:
            base = self.images.path(spec.boot.disk_sha256)
        except ImageError as exc:
            raise exc.for_guest(spec.name) from exc
        guest_dir = self._make_guest_dir(spec.name)
        placed = guest_dir / OVERLAY_FILE
        shutil.move(overlay, placed)
        # -u: only the backing file's name changes; its content is the same image.
        _run_qemu_img(
            spec.name, "rebase", "-u", "-f", "qcow2", "-F", "qcow2", "-b", str(base), str(placed)
        )
        return BootFiles(disk_overlay=placed), self.console_path(spec.name)

    def _define_and_restore(self, guest: str, xml: str, save_path: Path, paused: bool) -> None:
        with self._call("restore", guest):
            dom = self._conn.defineXML(xml)
        flags = libvirt.VIR_DOMAIN_SAVE_PAUSED if paused else 0
        try:
            with self._call("restore", guest):
                self._conn.restoreFlags(str(save_path), xml, flags)
        except BaseException:
            self._forget(guest)
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
        dom = self._domain("arrived", guest)
        with self._call("arrived", guest):
            if not dom.isPersistent():
                return False
            stats = dom.jobStats(0) if dom.isActive() else {}
        return bool(stats.get("operation") != libvirt.VIR_DOMAIN_JOB_OPERATION_MIGRATION_IN)

    def migrate_live(
        self,
        guest: str,
        target: MigrationTarget,
        options: MigrationOptions,
        progress: Callable[[MigrationProgress], None] | None = None,
    ) -> MigrationOutcome:
        """Move the running guest to another host's libvirt while it runs (migration.py).

        On success the guest is gone from this host (undefined, its files removed). On
        MigrationError it is still here, running if it was (see `source_state`).
        """
        # migration.py builds on this module (GuestState), so it is imported here.
        from donor_app.hypervisor import migration  # noqa: PLC0415

        dom = self._domain("migrate", guest)
        # A duty cycle's suspend/resume would fight the pause libvirt takes at the end.
        self._stop_duty(guest)
        with self._lock:
            self._leaving.add(guest)
        try:
            outcome = migration.migrate_live(dom, guest, target, options, progress)
        except migration.MigrationError:
            self._restart_duty(guest, dom)
            raise
        finally:
            with self._lock:
                self._leaving.discard(guest)
        with self._lock:
            self._caps.pop(guest, None)
        self._forget(guest)
        shutil.rmtree(self.guest_dir(guest), ignore_errors=True)
        return outcome

    def _restart_duty(self, guest: str, dom: Any) -> None:
        """Put a duty-cycle cap back on a guest that stayed here, running."""
        with self._lock:
            cap = self._caps.get(guest, 100.0)
        if not (0 < cap < 100 and self._cpu_cap_mode == "duty-cycle"):
            return
        try:
            running = guest_state_of(dom) is GuestState.RUNNING
        except libvirt.libvirtError:
            return
        if running:
            self._start_duty(guest, dom, cap)

    # --- usage ------------------------------------------------------------------------

    def _qemu_process(self, guest: str, dom: Any) -> process.ProcessRef | None:
        with self._lock:
            ref = self._processes.get(guest)
        if ref is not None and process.still_running(ref):
            return ref
        with self._call("usage", guest):
            if not dom.isActive():
                return None
            uuid = dom.UUIDString()
        ref = process.find_qemu_process(uuid)
        with self._lock:
            if ref is None:
                self._processes.pop(guest, None)
            else:
                self._processes[guest] = ref
        return ref

    def usage(self, guest: str) -> GuestUsage:
        """CPU seconds used so far and memory now (the balloon's current size)."""
        dom = self._domain("usage", guest)
        with self._call("usage", guest):
            info = dom.info()
            stats: dict[str, int] = dom.memoryStats() if dom.isActive() else {}
        memory_mib = stats.get("actual", info[2]) / 1024
        ref = self._qemu_process(guest, dom)
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
                dom = self._domain("usage", guest)
                ref = self._qemu_process(guest, dom)
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
                with self._lock:
                    return guest in self._duty and kind in ("suspended", "resumed")

            with _libvirt_call("subscribe_events", None):
                self._events = LifecycleEvents(self._conn, self.guest_name, muted)
        return self._events

    def ensure_isolated_network(self) -> None:
        """Define and start the isolated network guests with `network=True` join."""
        with _libvirt_call("network", None):
            names = self._conn.listDefinedNetworks() + self._conn.listNetworks()
            if ISOLATED_NETWORK in names:
                net = self._conn.networkLookupByName(ISOLATED_NETWORK)
            else:
                net = self._conn.networkDefineXML(build_isolated_network_xml())
            if not net.isActive():
                net.create()

    def close(self) -> None:
        """Stop duty cycles (guests keep running) and close the connection."""
        with self._lock:
            guests = list(self._duty)
        for guest in guests:
            self._stop_duty(guest)
        if self._events is not None:
            self._events.close()
            self._events = None
        with _libvirt_call("close", None):
            self._conn.close()


def _run_qemu_img(guest: str, command: str, *args: str) -> None:
    qemu_img = shutil.which("qemu-img")
    if qemu_img is None:
        raise HypervisorError(command, guest, "qemu-img not found (Debian: qemu-utils)")
    result = subprocess.run([qemu_img, command, *args], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise HypervisorError(command, guest, f"qemu-img {command}: {result.stderr.strip()}")
