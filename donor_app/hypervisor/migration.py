"""Live migration of one guest to another donor's libvirt, driven from the source host.

Client-managed, not peer-to-peer: this process opens the target's libvirt itself and
`virDomainMigrate3` runs the Begin/Prepare/Perform/Finish/Confirm steps between the two
daemons. The source daemon so needs no credentials for the target's libvirt; only the
migration stream (`MigrationTarget.migrate_uri`) goes from QEMU to QEMU. This process,
though, holds a read-write connection to the target's libvirt, which is root there: a
live move is only for two libvirt daemons one administrator controls, never between
donors that do not trust each other (docs/migration.md, "Live moves and trust").

`migrate3` blocks, so it runs on a worker thread while the caller's thread watches the
job: it reports progress and aborts the job at the deadline. Whatever happens the guest
is never lost: on failure it is still at the source, running again if it was running
before (libvirt resumes it when it cancels a migration; this module checks, and resumes
it where libvirt did not) — unless the target reports a running copy, since resuming
then would run the guest twice.

Only `Hypervisor.migrate_live` (host.py) calls this module.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import libvirt

from donor_app.domain.guest import GuestState
from donor_app.hypervisor.calls import guest_state_of
from donor_app.hypervisor.errors import HypervisorError
from donor_app.hypervisor.xml import BootFiles, domain_virt_type, retarget_domain_xml

log = logging.getLogger(__name__)

MIB = 1024 * 1024
POLL_S = 0.1  # how often the job is watched: progress and the deadline are this precise
ABORT_RETRY_S = 1.0  # an abort asked before the job can take it is asked again
# 100 GiB/s is beyond any network a donor has; a larger value is a unit mistake.
MAX_BANDWIDTH_MIBPS = 100_000
MIN_DOWNTIME_MS, MAX_DOWNTIME_MS = 1, 60_000
MIN_DEADLINE_S, MAX_DEADLINE_S = 1.0, 86_400.0
# Under TCG, QEMU before 9.0 loses guest writes during a live migration: after each sync
# of the dirty-page bitmap it leaves the software TLB's fast write path open, so stores
# through it are not marked dirty and the target keeps those pages as they were before
# (fixed upstream in 9.0: "physmem: Fix migration dirty bitmap coherency with TCG memory
# access"). The guest arrives with stale memory and crashes or hangs: with QEMU 7.2, 3 of
# 20 test guests moved with the stream capped at 8 MiB/s did. Such a guest moves paused
# instead: nothing writes while its memory is copied, at the price of a pause as long as
# the copy (docs/migration.md). KVM tracks dirty pages in the kernel and moves live.
TCG_LIVE_MIN_QEMU = 9_000_000  # QEMU 9.0.0, as libvirt's getVersion() counts


@dataclass(frozen=True, slots=True)
class MigrationTarget:
    """Where a guest goes: how the source reaches the target's libvirt
    (`libvirt_uri`, e.g. qemu+tls://donor-7/system), where QEMU's migration stream goes
    (`migrate_uri`, e.g. tcp://10.0.0.7), and the target's own paths for the guest (what
    the target's `Hypervisor.prepare_files` returned)."""

    libvirt_uri: str
    migrate_uri: str
    files: BootFiles
    console_log: Path


def _check_int(field: str, value: object, low: int, high: int, unit: str) -> None:
    # bool is an int subclass: True MiB/s is a mistake, not 1.
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{field}: {value!r} is outside the allowed range {low}–{high}{unit}")


@dataclass(frozen=True, slots=True)
class MigrationOptions:
    """How to migrate. `bandwidth_mibps` 0 is unlimited; `max_downtime_ms` is the pause
    QEMU may take to copy the last dirty memory; after `deadline_s` the migration is
    aborted and the guest stays at the source; `tls` encrypts the migration stream
    (needs libvirt's migration TLS certificates on both hosts)."""

    bandwidth_mibps: int = 0
    max_downtime_ms: int = 50
    deadline_s: float = 60.0
    tls: bool = False

    def __post_init__(self) -> None:
        _check_int(
            "bandwidth_mibps",
            self.bandwidth_mibps,
            0,
            MAX_BANDWIDTH_MIBPS,
            " MiB/s (0 = unlimited)",
        )
        _check_int("max_downtime_ms", self.max_downtime_ms, MIN_DOWNTIME_MS, MAX_DOWNTIME_MS, " ms")
        deadline = self.deadline_s
        if (
            isinstance(deadline, bool)
            or not isinstance(deadline, int | float)
            or not math.isfinite(deadline)
            or not MIN_DEADLINE_S <= deadline <= MAX_DEADLINE_S
        ):
            raise ValueError(
                f"deadline_s: {deadline!r} is outside the allowed range"
                f" {MIN_DEADLINE_S:g}–{MAX_DEADLINE_S:g} s"
            )
        if not isinstance(self.tls, bool):
            raise ValueError(f"tls: {self.tls!r} must be true or false")


@dataclass(frozen=True, slots=True)
class MigrationProgress:
    """One look at the running job. `iteration` counts QEMU's passes over guest memory."""

    elapsed_s: float
    data_processed_mib: float
    data_remaining_mib: float
    iteration: int


@dataclass(frozen=True, slots=True)
class MigrationOutcome:
    """A finished migration: its wall time, the guest's pause as libvirt reports it
    (None where libvirt gave no figure) and the data sent."""

    seconds: float
    downtime_ms: float | None
    data_mib: float


class MigrationError(HypervisorError):
    """A live migration failed. `source_state` is where the guest was left at the
    source: RUNNING or PAUSED (it is still there), None if it is not there any more."""

    def __init__(
        self,
        guest: str,
        detail: str,
        *,
        source_state: GuestState | None,
        code: int | None = None,
    ) -> None:
        super().__init__("migrate", guest, detail, code)
        self.source_state = source_state


@dataclass
class _Attempt:
    """What the worker thread's `migrate3` call gave: the target's domain or an error."""

    target_dom: Any = None
    error: Exception | None = None


def migrate_live(
    dom: Any,
    guest: str,
    target: MigrationTarget,
    options: MigrationOptions,
    progress: Callable[[MigrationProgress], None] | None = None,
) -> MigrationOutcome:
    """Move the running guest `dom` (a virDomain) to `target`; see the module docstring.

    Returns once the guest runs at the target (persistently defined there, undefined
    here). Raises MigrationError when it does not; `progress` is called on the
    caller's thread about every POLL_S while the job runs.
    """
    dest_conn = _open_target(dom, guest, target)
    try:
        return _Migration(dom, dest_conn, guest, target, options).run(progress)
    finally:
        _close_quietly(dest_conn)


def _open_target(dom: Any, guest: str, target: MigrationTarget) -> Any:
    """The target's libvirt connection, opened before anything touches the guest."""
    try:
        return libvirt.open(target.libvirt_uri)
    except libvirt.libvirtError as exc:
        raise MigrationError(
            guest,
            f"target unreachable: {target.libvirt_uri}: {exc.get_error_message()}",
            source_state=_state(dom),
            code=exc.get_error_code(),
        ) from exc


def _close_quietly(conn: Any) -> None:
    try:
        conn.close()
    except libvirt.libvirtError as exc:  # a target that died mid-way: nothing to close
        log.debug("closing the target's libvirt connection: %s", exc)


def _state(dom: Any) -> GuestState | None:
    """The guest's state at the source, None if libvirt no longer has it there."""
    try:
        return guest_state_of(dom)
    except libvirt.libvirtError:
        return None


@dataclass(frozen=True)
class _Migration:
    """One migration of `dom` over the open target connection `dest_conn`."""

    dom: Any
    dest_conn: Any
    guest: str
    target: MigrationTarget
    options: MigrationOptions

    def run(self, progress: Callable[[MigrationProgress], None] | None) -> MigrationOutcome:
        was_running, params, flags = self._prepare()
        attempt = _Attempt()
        worker = threading.Thread(
            target=_run_migrate3,
            args=(self.dom, self.dest_conn, params, flags, attempt),
            name=f"migrate-{self.guest}",
            daemon=True,
        )
        started = time.monotonic()
        worker.start()
        aborted, last = _watch(self.dom, worker, started, self.options, progress)
        elapsed = time.monotonic() - started
        if attempt.error is None:
            return _outcome(attempt.target_dom, elapsed, last)
        return self._after_failure(attempt.error, elapsed, aborted=aborted, was_running=was_running)

    def _prepare(self) -> tuple[bool, dict[str, Any], int]:
        """Whether the guest runs now, migrate3's parameters and flags; sets the max
        downtime."""
        try:
            was_running = guest_state_of(self.dom) is GuestState.RUNNING
            params = _params(self.dom, self.target, self.options)
            flags = _flags(self.options, live=_live(self.dom, self.guest))
            # No migrate3 parameter carries the downtime in libvirt 9.0. Set before the
            # job, QEMU keeps it for the job (its stats show it as the expected downtime).
            self.dom.migrateSetMaxDowntime(self.options.max_downtime_ms, 0)
        except libvirt.libvirtError as exc:
            raise MigrationError(
                self.guest,
                exc.get_error_message(),
                source_state=_state(self.dom),
                code=exc.get_error_code(),
            ) from exc
        except ValueError as exc:  # the guest's XML does not fit the target's files
            raise MigrationError(self.guest, str(exc), source_state=_state(self.dom)) from exc
        return was_running, params, flags

    def _after_failure(
        self, error: Exception, elapsed: float, *, aborted: bool, was_running: bool
    ) -> MigrationOutcome:
        """Find the guest after `migrate3` failed: return the outcome if it runs at the
        target after all, else raise MigrationError saying where it was left."""
        at_target = _active_at(self.dest_conn, self.dom.name())
        state = _state(self.dom)
        if state is None and at_target is not None:
            # Gone from here and running there: the migration completed, only one of
            # libvirt's last steps reported an error.
            log.warning("migration of %s: %s, yet the guest runs at the target", self.guest, error)
            return _outcome(at_target, elapsed, None)
        if state is not None and at_target is not None and _discard_arrival(at_target):
            at_target = None
        if state is GuestState.PAUSED and was_running:
            state = _resume_source(self.dom, self.guest, active_at_target=at_target is not None)
        what = (
            f"aborted after {elapsed:.1f} s (deadline {self.options.deadline_s:g} s)"
            if aborted
            else f"failed after {elapsed:.1f} s"
        )
        raise MigrationError(
            self.guest,
            f"migration of {self.guest} to {self.target.libvirt_uri} {what}:"
            f" {_message(error)}; {_where(state, active_at_target=at_target is not None)}",
            source_state=state,
            code=error.get_error_code() if isinstance(error, libvirt.libvirtError) else None,
        ) from error


def _live(dom: Any, guest: str) -> bool:
    """Whether the guest may run while its memory is copied (see TCG_LIVE_MIN_QEMU)."""
    if domain_virt_type(dom.XMLDesc(0)) != "qemu":
        return True
    version = int(dom.connect().getVersion())
    if version >= TCG_LIVE_MIN_QEMU:
        return True
    log.info("%s runs under TCG on QEMU %d: it moves paused, not live", guest, version)
    return False


def _flags(options: MigrationOptions, *, live: bool) -> int:
    # LIVE: the guest runs while its memory is copied. PERSIST_DEST and UNDEFINE_SOURCE:
    # the definition moves too, so afterwards the guest exists on exactly one host.
    flags = int(libvirt.VIR_MIGRATE_PERSIST_DEST | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE)
    if live:
        flags |= libvirt.VIR_MIGRATE_LIVE
    if options.tls:
        flags |= libvirt.VIR_MIGRATE_TLS
    return flags


def _params(dom: Any, target: MigrationTarget, options: MigrationOptions) -> dict[str, Any]:
    name = dom.name()

    def retarget(xml_flags: int) -> str:
        return retarget_domain_xml(
            dom.XMLDesc(xml_flags),
            domain_name=name,
            files=target.files,
            console_log=target.console_log,
        )

    params: dict[str, Any] = {
        libvirt.VIR_MIGRATE_PARAM_URI: target.migrate_uri,
        # The running guest's definition, with the target's paths.
        libvirt.VIR_MIGRATE_PARAM_DEST_XML: retarget(libvirt.VIR_DOMAIN_XML_MIGRATABLE),
        # Without this the target would persist the source's inactive definition, whose
        # paths exist only on the source: the guest could not boot there again.
        libvirt.VIR_MIGRATE_PARAM_PERSIST_XML: retarget(
            libvirt.VIR_DOMAIN_XML_MIGRATABLE | libvirt.VIR_DOMAIN_XML_INACTIVE
        ),
    }
    if options.bandwidth_mibps > 0:
        params[libvirt.VIR_MIGRATE_PARAM_BANDWIDTH] = options.bandwidth_mibps
    return params


def _run_migrate3(
    dom: Any, dest_conn: Any, params: dict[str, Any], flags: int, attempt: _Attempt
) -> None:
    try:
        attempt.target_dom = dom.migrate3(dest_conn, params, flags)
    except Exception as exc:  # handed to the caller's thread, which raises it
        attempt.error = exc


def _watch(
    dom: Any,
    worker: threading.Thread,
    started: float,
    options: MigrationOptions,
    progress: Callable[[MigrationProgress], None] | None,
) -> tuple[bool, MigrationProgress | None]:
    """Wait for the worker, reporting progress and aborting at the deadline.

    Returns whether the deadline abort was asked, and the last progress seen. After an
    abort it still waits for `migrate3` to return: until then libvirt may yet complete
    the migration, and only its answer tells where the guest is.
    """
    aborted = abort_taken = False
    last_try = -math.inf
    last: MigrationProgress | None = None
    while True:
        worker.join(POLL_S)
        if not worker.is_alive():
            return aborted, last
        now = time.monotonic()
        snapshot = _progress(dom, now - started)
        if snapshot is not None:
            last = snapshot
            _report(progress, snapshot)
        if now - started >= options.deadline_s:
            aborted = True
            if not abort_taken and now - last_try >= ABORT_RETRY_S:
                last_try = now
                abort_taken = _abort(dom)


def _progress(dom: Any, elapsed: float) -> MigrationProgress | None:
    try:
        stats: dict[str, Any] = dom.jobStats(0)
    except libvirt.libvirtError:
        return None  # the job is ending, or the guest has just left
    if stats.get("type", libvirt.VIR_DOMAIN_JOB_NONE) == libvirt.VIR_DOMAIN_JOB_NONE:
        return None
    return MigrationProgress(
        elapsed_s=elapsed,
        data_processed_mib=stats.get("data_processed", 0) / MIB,
        data_remaining_mib=stats.get("data_remaining", 0) / MIB,
        iteration=int(stats.get("memory_iteration", 0)),
    )


def _report(
    progress: Callable[[MigrationProgress], None] | None, snapshot: MigrationProgress
) -> None:
    if progress is None:
        return
    try:
        progress(snapshot)
    except Exception:  # a broken observer must not leave a migration unwatched
        log.exception("migration progress callback failed")


def _abort(dom: Any) -> bool:
    """Ask libvirt to cancel the job; whether it took the request."""
    try:
        dom.abortJob()
    except libvirt.libvirtError as exc:
        # Not every phase of the job can be aborted: the next try comes ABORT_RETRY_S
        # later. Once taken, libvirt winds the migration down on its own (seconds).
        log.info("aborting the migration of %s: %s", dom.name(), exc.get_error_message())
        return False
    return True


def _outcome(target_dom: Any, elapsed: float, last: MigrationProgress | None) -> MigrationOutcome:
    # The source's record of the job goes with the source domain; the target keeps the
    # completed job's statistics, downtime included.
    try:
        stats: dict[str, Any] = target_dom.jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED)
    except libvirt.libvirtError as exc:
        log.info("no statistics of the completed migration: %s", exc.get_error_message())
        stats = {}
    downtime = stats.get("downtime")
    if "data_processed" in stats:
        data_mib = stats["data_processed"] / MIB
    else:
        data_mib = last.data_processed_mib if last is not None else 0.0
    return MigrationOutcome(
        seconds=elapsed,
        downtime_ms=float(downtime) if downtime is not None else None,
        data_mib=data_mib,
    )


def _message(error: Exception) -> str:
    if isinstance(error, libvirt.libvirtError):
        return str(error.get_error_message() or error)
    return str(error)


def _active_at(dest_conn: Any, domain_name: str) -> Any | None:
    """The target's domain if it is active there; None if not, or if the target cannot
    be asked (a target whose libvirt died took its QEMU processes with it)."""
    try:
        target_dom = dest_conn.lookupByName(domain_name)
        return target_dom if target_dom.isActive() else None
    except libvirt.libvirtError:
        return None


def _discard_arrival(target_dom: Any) -> bool:
    """Destroy a copy left paused at the target by a failed migration; whether it went.

    A paused copy never ran (the target resumes it only when the move succeeds), so the
    source's copy is the guest and this one only blocks the name there. A running copy
    is left alone: then the target's may be the guest.
    """
    try:
        if guest_state_of(target_dom) is not GuestState.PAUSED:
            return False
        target_dom.destroy()
    except libvirt.libvirtError as exc:
        log.warning("could not remove the half-arrived copy at the target: %s", exc)
        return False
    return True


def _resume_source(dom: Any, guest: str, *, active_at_target: bool) -> GuestState:
    if active_at_target:
        log.warning("%s is active at the target too: left paused at the source", guest)
        return GuestState.PAUSED
    try:
        dom.resume()
    except libvirt.libvirtError as exc:
        log.warning("could not resume %s after a failed migration: %s", guest, exc)
        return GuestState.PAUSED
    return GuestState.RUNNING


def _where(state: GuestState | None, *, active_at_target: bool) -> str:
    if state is None:
        return "the guest is no longer at the source"
    also = " (and active at the target too)" if active_at_target else ""
    return f"the guest is {state.value} at the source{also}"
