"""The fleet's workloads on this donor: run, stop and checkpoint them, report their state.

Each workload runs as a guest named after its workload id (ids are unique, so a fleet
guest never collides with a local one). Which workloads this donor holds, at which
epoch, is kept in a small JSON file so that after a restart the agent reports exactly
what it holds and the coordinator can fence stale copies.

Every command is idempotent: the coordinator may resend it after a broken stream.
Quick hypervisor calls go through `run_on_engine` (the engine's thread owns the
hypervisor); the long ones — a live migration, saving and restoring a checkpoint — run
on the link's command thread (libvirt connections are thread-safe) so the engine keeps
protecting the owner meanwhile.

Moves (see donor_app/coordinator/fleet/move.py): as a target this donor prepares (images,
paths) and holds the workload at the move's epoch while the guest arrives, reporting it
"stopped" until it has fully arrived; as a source it live-migrates to the prepared
target, or saves the guest and uploads the checkpoint.

About 500 lines, one class: one method per coordinator command, all sharing the held
workloads' ledger and its lock; what is not about that ledger (the bundle format, the
moves journal, the hypervisor's files) lives in the modules beside it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Protocol, TypeVar

from donor_app.agent.link.bundle import BundleError, is_bundle, read_bundle, write_bundle
from donor_app.agent.link.journal import MoveJournal
from donor_app.atomic_file import write_atomic
from donor_app.domain import link
from donor_app.domain.guest import GuestState
from donor_app.domain.status import MoveEvent
from donor_app.domain.vm import VmSpec
from donor_app.hypervisor.errors import HypervisorError, ImageError
from donor_app.hypervisor.host import Hypervisor
from donor_app.hypervisor.migration import MigrationOptions, MigrationTarget
from donor_app.hypervisor.xml import BootFiles
from donor_app.private_files import open_private, private_dir
from donor_app.settings.config import MigrationEndpoint

log = logging.getLogger(__name__)

_T = TypeVar("_T")
RunOnEngine = Callable[[Callable[[], _T]], _T]


class ImageSource(Protocol):
    """Fetches an image by sha256 (the coordinator's FetchImage). Called on the link's
    command thread; may block for as long as the download takes."""

    def fetch(self, sha256: str) -> Iterator[bytes]: ...


class CheckpointTransport(Protocol):
    """The coordinator's PushCheckpoint/PullCheckpoint. Called on the command thread."""

    def push(
        self, workload_id: str, epoch: int, path: Path, sha256: str
    ) -> link.CheckpointInfo: ...

    def pull(self, workload_id: str, epoch: int, sha256: str) -> Iterator[bytes]: ...


class WorkloadError(Exception):
    """A command could not be carried out; the text goes back to the coordinator."""


CHECKPOINT_FILE = "checkpoint.save"
BUNDLE_FILE = "checkpoint.bundle"  # a disk guest's save file and overlay, to upload


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


class FleetWorkloads:
    def __init__(
        self,
        hv: Hypervisor,
        state_file: Path,
        run_on_engine: Callable[[Callable[[], object]], object],
        migration: MigrationEndpoint | None = None,
        *,
        journal: MoveJournal | None = None,
    ) -> None:
        self._hv = hv
        self._journal = journal
        self._file = state_file
        self._on_engine = run_on_engine
        self._migration = migration
        self._lock = threading.Lock()
        self._held: dict[str, int] = self._load()  # workload id → epoch
        self._starting: set[str] = set()
        # Prepared for a live migration to here, not yet arrived (not kept across a
        # restart: the coordinator tells a restarted donor to forget it).
        self._incoming: set[str] = set()
        # The last report of each guest (the engine thread's, replaced as a whole).
        self._last_reports: dict[str, link.GuestReport] = {}
        # The donor each incoming guest comes from, for the journal when it arrives.
        self._sources: dict[str, str] = {}
        self._forget_downloads()

    # --- state file ------------------------------------------------------------------------

    def _load(self) -> dict[str, int]:
        try:
            raw = json.loads(self._file.read_text())
            return {str(k): int(v) for k, v in raw.items()}
        except FileNotFoundError:
            return {}
        except (ValueError, TypeError, AttributeError, OSError) as error:
            # Unreadable: report nothing; the coordinator fences whatever we still run.
            log.error("%s is unreadable (%s); starting with no fleet workloads", self._file, error)
            return {}

    def _save(self) -> None:
        self._file.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(self._file, json.dumps(self._held).encode())

    def _forget_downloads(self) -> None:
        """Remove checkpoints a restore was downloading or unpacking when the agent
        stopped: they hold a guest's memory (an older version left them readable by
        others) and are of no use (a restore downloads afresh)."""
        directory = self._hv.state_dir / "incoming"
        if not directory.is_dir():
            return
        private_dir(directory)
        for leftover in directory.iterdir():
            if leftover.is_dir() and not leftover.is_symlink():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)
            log.info("removed %s, left by a restore that did not finish", leftover)

    # --- what we hold ------------------------------------------------------------------------

    def names(self) -> frozenset[str]:
        with self._lock:
            return frozenset(self._held)

    def reports(self) -> tuple[link.GuestReport, ...]:
        """The state of every workload this donor holds (engine thread: hypervisor)."""
        with self._lock:
            held = dict(self._held)
            starting = set(self._starting)
            incoming = set(self._incoming)

        def look() -> list[link.GuestReport]:
            looked = (self._report(w, e, w in starting, w in incoming) for w, e in held.items())
            return [report for report in looked if report is not None]

        result = self._on_engine(look)
        assert isinstance(result, list)
        self._last_reports = {report.workload_id: report for report in result}
        return tuple(result)

    def _report(
        self, workload_id: str, epoch: int, starting: bool, incoming: bool
    ) -> link.GuestReport | None:
        """None: the guest's state cannot be known right now (and was not known before)."""
        if starting:
            return link.GuestReport(workload_id, epoch, GuestState.STARTING)
        try:
            if not self._hv.exists(workload_id):
                return link.GuestReport(workload_id, epoch, GuestState.STOPPED, "not defined")
            if incoming:
                if not self._arrived(workload_id):
                    # Mid-migration the guest exists here, paused and transient: it is not
                    # ours until libvirt finished the move (the source still runs it).
                    return link.GuestReport(workload_id, epoch, GuestState.STOPPED, "arriving")
                with self._lock:
                    # Another report may have seen it land first: journal it once.
                    landed = workload_id in self._incoming
                    self._incoming.discard(workload_id)
                    source = self._sources.pop(workload_id, "")
                if landed:
                    self._moved("arrived", workload_id, source, "live")
            state = self._hv.state(workload_id)
            if state is GuestState.STOPPED and (
                self._hv.has_managed_save(workload_id) or self._saved(workload_id).exists()
            ):
                return link.GuestReport(workload_id, epoch, GuestState.CHECKPOINTED)
        except HypervisorError as error:
            # Failing to look at a guest (libvirt busy or restarting) says nothing about
            # the guest: "failed" would end the workload for good. Report what was last
            # known; the guest's lease covers a few reports without it.
            log.warning("cannot look at %s: %s", workload_id, error)
            last = self._last_reports.get(workload_id)
            return last if last is not None and last.epoch == epoch else None
        # A state the hypervisor cannot tell is no state the coordinator could act on.
        reported = GuestState.FAILED if state is GuestState.OTHER else state
        return link.GuestReport(workload_id, epoch, reported)

    def _arrived(self, workload_id: str) -> bool:
        """Whether an incoming guest has fully arrived. libvirt may refuse to look at it
        while it finishes the move (the domain's job lock): that is "still arriving",
        never "failed" — a failed report would get the guest fenced as it lands."""
        try:
            return self._hv.arrived(workload_id)
        except HypervisorError as error:
            log.info("%s: still arriving (%s)", workload_id, error)
            return False

    # --- commands ----------------------------------------------------------------------------

    def _saved(self, workload_id: str) -> Path:
        return self._hv.guest_dir(workload_id) / CHECKPOINT_FILE

    def run(
        self,
        command: link.RunWorkload,
        images: ImageSource,
        checkpoints: CheckpointTransport | None = None,
    ) -> None:
        workload_id = command.workload_id
        with self._lock:
            held_epoch = self._held.get(workload_id)
        if held_epoch is not None and held_epoch > command.epoch:
            raise WorkloadError(f"held at epoch {held_epoch}, newer than {command.epoch}")
        if held_epoch == command.epoch and self._exists(workload_id):
            return  # a resent command: already running here
        with self._lock:
            self._held[workload_id] = command.epoch
            self._starting.add(workload_id)
            self._incoming.discard(workload_id)
            self._save()
        try:
            for sha256 in command.spec.images():
                self._ensure_image(sha256, images)
            spec = replace(command.spec, name=workload_id)
            if command.checkpoint is not None:
                if checkpoints is None:
                    raise WorkloadError("no checkpoint transport")
                self._restore(spec, command, command.checkpoint, checkpoints)
            else:

                def create() -> None:
                    if self._hv.exists(workload_id):  # an older epoch's copy
                        self._remove(workload_id)
                    self._hv.create(spec)

                self._on_engine(create)
            log.info("workload %s started (epoch %d)", workload_id, command.epoch)
            if command.checkpoint is not None:
                self._moved("restored", workload_id, command.checkpoint.donor_id)
            else:
                self._moved("started", workload_id)
        except (HypervisorError, ImageError, OSError, ValueError, WorkloadError) as error:
            with self._lock:
                self._held.pop(workload_id, None)
                self._save()
            raise WorkloadError(f"cannot run {workload_id}: {error}") from None
        finally:
            with self._lock:
                self._starting.discard(workload_id)

    def _with_overlay(self, workload_id: str, saved: Path) -> Path:
        """The file to upload: the save file, or a disk guest's bundle of it and its
        overlay (written while the guest is stopped, so the two match)."""
        overlay = self._hv.disk_overlay(workload_id)
        if overlay is None:
            return saved
        out = saved.with_name(BUNDLE_FILE)
        write_bundle(saved, overlay, out)
        return out

    def _restore(
        self,
        spec: VmSpec,
        command: link.RunWorkload,
        checkpoint: link.CheckpointInfo,
        checkpoints: CheckpointTransport,
    ) -> None:
        """Download the checkpoint (verified against its sha256 as it arrives) and bring
        the guest back from it. The download is the guest's memory: 0600 in a 0700
        directory (libvirt reads a save file itself and hands QEMU its content)."""
        directory = private_dir(self._hv.state_dir / "incoming")
        path = directory / f"{spec.name}.save"
        unpacked = directory / f"{spec.name}.unpacked"
        digest = hashlib.sha256()
        size = 0
        try:
            with open_private(path) as out:
                for block in checkpoints.pull(
                    command.workload_id, command.epoch, checkpoint.sha256
                ):
                    digest.update(block)
                    size += len(block)
                    out.write(block)
            if digest.hexdigest() != checkpoint.sha256 or size != checkpoint.size:
                raise WorkloadError(
                    f"checkpoint {checkpoint.sha256[:12]}: received {size} bytes hashing to"
                    f" {digest.hexdigest()[:12]}, expected {checkpoint.size} bytes"
                )
            if self._exists(spec.name):  # an older epoch's copy
                self._on_engine(lambda: self._remove(spec.name))
            if is_bundle(path):
                state, overlay = read_bundle(path, unpacked)
                self._hv.restore_elsewhere(spec, state, disk_overlay=overlay)
            else:
                self._hv.restore_elsewhere(spec, path)
            log.info(
                "workload %s restored from the checkpoint taken at %s on donor %s",
                spec.name,
                checkpoint.taken_at.isoformat(timespec="seconds"),
                checkpoint.donor_id or "?",
            )
        except BundleError as error:
            raise WorkloadError(str(error)) from None
        finally:
            path.unlink(missing_ok=True)
            shutil.rmtree(unpacked, ignore_errors=True)

    def _exists(self, workload_id: str) -> bool:
        return bool(self._on_engine(lambda: self._hv.exists(workload_id)))

    def _ensure_image(self, sha256: str, images: ImageSource) -> None:
        cache = self._hv.images
        if cache.has(sha256):
            return
        fd, name = tempfile.mkstemp(prefix=f"{sha256[:12]}-", dir=cache.incoming_dir())
        tmp = Path(name)
        try:
            with os.fdopen(fd, "wb") as out:
                for block in images.fetch(sha256):
                    out.write(block)
            # add_file verifies the content against the sha256 and refuses a mismatch.
            cache.add_file(tmp, expected_sha256=sha256)
        finally:
            tmp.unlink(missing_ok=True)

    def _remove(self, workload_id: str) -> None:
        """Engine thread: destroy and undefine (also its managed save)."""
        try:
            if self._hv.state(workload_id) is not GuestState.STOPPED:
                self._hv.destroy(workload_id)
            self._hv.undefine(workload_id)
        except HypervisorError as error:
            if not error.not_found:
                raise

    def stop(self, command: link.StopWorkload) -> None:
        """Remove our copy (cancelled, or fenced: the workload runs elsewhere now)."""
        workload_id = command.workload_id
        with self._lock:
            held_epoch = self._held.get(workload_id)
        if held_epoch is not None and held_epoch > command.epoch:
            raise WorkloadError(f"held at epoch {held_epoch}, newer than {command.epoch}")
        with self._lock:
            incoming = workload_id in self._incoming
        if incoming and self._exists(workload_id) and not self._arrived(workload_id):
            # A migration to here is under way: it ends on its own (arrived → reported
            # running; failed → gone). Destroying it now could lose the guest.
            raise WorkloadError(f"{workload_id} is arriving by live migration; try later")
        try:
            self._on_engine(lambda: self._remove(workload_id))
        except HypervisorError as error:
            raise WorkloadError(f"cannot stop {workload_id}: {error}") from None
        with self._lock:
            self._held.pop(workload_id, None)
            self._incoming.discard(workload_id)
            self._sources.pop(workload_id, None)
            self._save()
        log.info("workload %s stopped: %s", workload_id, command.reason)
        # Not for a resent command (no longer held), nor for a guest that never arrived.
        if held_epoch is not None and not incoming:
            self._moved("removed", workload_id, detail=command.reason)

    def checkpoint(
        self, command: link.Checkpoint, transport: CheckpointTransport | None = None
    ) -> link.CheckpointInfo | None:
        """Save the guest to its checkpoint file (the guest stops; with keep_running it
        is restored from that file at once), then upload the file if asked — for a disk
        guest, bundled with its disk overlay as it was at the save (bundle.py)."""
        workload_id = command.workload_id
        self._check_epoch(workload_id, command.epoch)
        path = self._saved(workload_id)
        upload = path
        try:
            state = self._hv.state(workload_id)
            if state is GuestState.STOPPED:
                if not path.exists():
                    raise WorkloadError(f"{workload_id} is not running: nothing to save")
            else:
                path.unlink(missing_ok=True)
                self._hv.save(workload_id, path)
            try:
                if command.upload and transport is not None:
                    upload = self._with_overlay(workload_id, path)  # the guest is stopped
            finally:
                if state is not GuestState.STOPPED and command.keep_running:
                    self._hv.restore(workload_id, path)
        except HypervisorError as error:
            raise WorkloadError(f"cannot checkpoint {workload_id}: {error}") from None
        except OSError as error:
            raise WorkloadError(f"cannot bundle {workload_id}'s disk: {error}") from None
        log.info("workload %s saved to %s", workload_id, path)
        if not command.upload or transport is None:
            return None
        try:
            info = transport.push(workload_id, command.epoch, upload, file_sha256(upload))
        finally:
            if upload != path:
                upload.unlink(missing_ok=True)
            if command.keep_running:
                path.unlink(missing_ok=True)  # the guest runs on; the file is stale now
        log.info("workload %s checkpoint uploaded (%.1f MiB)", workload_id, info.size / 2**20)
        if not command.keep_running:  # a periodic checkpoint leaves the guest running here
            self._moved("saved", workload_id, detail=f"{info.size / 2**20:.1f} MiB")
        return info

    def prepare(self, command: link.PrepareMigration, images: ImageSource) -> link.MigrationTarget:
        """Get ready to receive a live migration: images, paths, and the hold at the
        move's epoch (reported "stopped" until the guest has arrived)."""
        workload_id = command.workload_id
        if self._migration is None:
            raise WorkloadError(
                "this donor takes no live migrations: no [migration] libvirt_uri configured"
            )
        with self._lock:
            held_epoch = self._held.get(workload_id)
        if held_epoch is not None and held_epoch != command.epoch and self._exists(workload_id):
            raise WorkloadError(f"{workload_id} is already here at epoch {held_epoch}")
        spec = replace(command.spec, name=workload_id)
        try:
            for sha256 in spec.images():
                self._ensure_image(sha256, images)
            files, console = self._hv.prepare_files(spec)
        except (HypervisorError, ImageError, OSError) as error:
            raise WorkloadError(f"cannot prepare for {workload_id}: {error}") from None
        with self._lock:
            self._held[workload_id] = command.epoch
            self._incoming.add(workload_id)
            self._sources[workload_id] = command.source_donor_id
            self._save()
        log.info("ready to receive %s (epoch %d)", workload_id, command.epoch)
        return link.MigrationTarget(
            libvirt_uri=self._migration.libvirt_uri,
            migrate_uri=self._migration.migrate_uri,
            kernel_path=str(files.kernel or ""),
            initrd_path=str(files.initrd or ""),
            console_path=str(console),
        )

    def evacuate(self, command: link.Evacuate) -> link.MigrationReport:
        """Live-migrate to the prepared target. On failure the guest is still here
        (running or paused) and WorkloadError says why."""
        workload_id = command.workload_id
        self._check_epoch(workload_id, command.epoch)
        if command.target is None:
            raise WorkloadError("evacuate: the target did not prepare")
        wire = command.target
        limits = command.limits
        try:
            target = MigrationTarget(
                libvirt_uri=wire.libvirt_uri,
                migrate_uri=wire.migrate_uri,
                files=BootFiles(
                    kernel=Path(wire.kernel_path),
                    initrd=Path(wire.initrd_path) if wire.initrd_path else None,
                ),
                console_log=Path(wire.console_path),
            )
            options = MigrationOptions(
                bandwidth_mibps=limits.bandwidth_mibps,
                max_downtime_ms=limits.max_downtime_ms,
                deadline_s=float(limits.deadline_s),
                tls=limits.tls,
            )
            outcome = self._hv.migrate_live(workload_id, target, options)
        except (HypervisorError, ValueError) as error:
            raise WorkloadError(f"live migration failed: {error}") from None
        with self._lock:
            self._held.pop(workload_id, None)
            self._save()
        log.info(
            "workload %s migrated to donor %s in %.1f s",
            workload_id,
            command.target_donor_id,
            outcome.seconds,
        )
        self._moved("left", workload_id, command.target_donor_id, f"live, {outcome.seconds:.1f} s")
        return link.MigrationReport(outcome.seconds, outcome.downtime_ms or 0.0)

    def _check_epoch(self, workload_id: str, epoch: int) -> None:
        with self._lock:
            held_epoch = self._held.get(workload_id)
        if held_epoch != epoch:
            raise WorkloadError(f"{workload_id} is not held here at epoch {epoch}")

    # --- the owner's journal of moves ---------------------------------------------------------

    def _moved(self, event: MoveEvent, workload_id: str, peer: str = "", detail: str = "") -> None:
        """Journal a move that happened (never raises: the journal logs its own trouble)."""
        if self._journal is not None:
            self._journal.record(event, workload_id, peer, detail)
