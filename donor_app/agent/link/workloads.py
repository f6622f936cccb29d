"""The fleet's workloads on this donor: run, stop and checkpoint them, report their state.

Each workload runs as a guest named after its workload id (ids are unique, so a fleet
guest never collides with a local one). Which workloads this donor holds, at which
epoch, is kept in a small JSON file so that after a restart the agent reports exactly
what it holds and the coordinator can fence stale copies.

Every command is idempotent: the coordinator may resend it after a broken stream.
Hypervisor calls go through `run_on_engine` (the engine's thread owns the hypervisor).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Protocol, TypeVar

from donor_app.domain import link
from donor_app.hypervisor.errors import HypervisorError, ImageError
from donor_app.hypervisor.host import GuestState, Hypervisor

log = logging.getLogger(__name__)

_T = TypeVar("_T")
RunOnEngine = Callable[[Callable[[], _T]], _T]


class ImageSource(Protocol):
    """Fetches an image by sha256 (the coordinator's FetchImage). Called on the link's
    command thread; may block for as long as the download takes."""

    def fetch(self, sha256: str) -> Iterator[bytes]: ...


class WorkloadError(Exception):
    """A command could not be carried out; the text goes back to the coordinator."""


class FleetWorkloads:
    def __init__(
        self,
        hv: Hypervisor,
        state_file: Path,
        run_on_engine: Callable[[Callable[[], object]], object],
    ) -> None:
        self._hv = hv
        self._file = state_file
        self._on_engine = run_on_engine
        self._lock = threading.Lock()
        self._held: dict[str, int] = self._load()  # workload id → epoch
        self._starting: set[str] = set()

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
        fd, tmp = tempfile.mkstemp(prefix=".fleet-", dir=self._file.parent)
        with os.fdopen(fd, "w") as f:
            json.dump(self._held, f)
        os.replace(tmp, self._file)

    # --- what we hold ------------------------------------------------------------------------

    def names(self) -> frozenset[str]:
        with self._lock:
            return frozenset(self._held)

    def reports(self) -> tuple[link.GuestReport, ...]:
        """The state of every workload this donor holds (engine thread: hypervisor)."""
        with self._lock:
            held = dict(self._held)
            starting = set(self._starting)

        def look() -> list[link.GuestReport]:
            return [self._report(w, e, w in starting) for w, e in held.items()]

        result = self._on_engine(look)
        assert isinstance(result, list)
        return tuple(result)

    def _report(self, workload_id: str, epoch: int, starting: bool) -> link.GuestReport:
        if starting:
            return link.GuestReport(workload_id, epoch, link.GuestState.STARTING)
        try:
            if not self._hv.exists(workload_id):
                return link.GuestReport(workload_id, epoch, link.GuestState.STOPPED, "not defined")
            state = self._hv.state(workload_id)
            if state is GuestState.SHUTOFF and self._hv.has_managed_save(workload_id):
                return link.GuestReport(workload_id, epoch, link.GuestState.CHECKPOINTED)
        except HypervisorError as error:
            return link.GuestReport(workload_id, epoch, link.GuestState.FAILED, str(error))
        mapped = {
            GuestState.RUNNING: link.GuestState.RUNNING,
            GuestState.PAUSED: link.GuestState.PAUSED,
            GuestState.SHUTOFF: link.GuestState.STOPPED,
            GuestState.CRASHED: link.GuestState.FAILED,
        }.get(state, link.GuestState.FAILED)
        return link.GuestReport(workload_id, epoch, mapped)

    # --- commands ----------------------------------------------------------------------------

    def run(self, command: link.RunWorkload, images: ImageSource) -> None:
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
            self._save()
        try:
            for sha256 in command.spec.images():
                self._ensure_image(sha256, images)
            spec = replace(command.spec, name=workload_id)

            def create() -> None:
                if self._hv.exists(workload_id):  # an older epoch's copy
                    self._remove(workload_id)
                self._hv.create(spec)

            self._on_engine(create)
            log.info("workload %s started (epoch %d)", workload_id, command.epoch)
        except (HypervisorError, ImageError, OSError, ValueError) as error:
            with self._lock:
                self._held.pop(workload_id, None)
                self._save()
            raise WorkloadError(f"cannot run {workload_id}: {error}") from None
        finally:
            with self._lock:
                self._starting.discard(workload_id)

    def _exists(self, workload_id: str) -> bool:
        return bool(self._on_engine(lambda: self._hv.exists(workload_id)))

    def _ensure_image(self, sha256: str, images: ImageSource) -> None:
        cache = self._hv.images
        if cache.has(sha256):
            return
        directory = cache.root / "incoming"
        directory.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f"{sha256[:12]}-", dir=directory)
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
            if self._hv.state(workload_id) is not GuestState.SHUTOFF:
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
        try:
            self._on_engine(lambda: self._remove(workload_id))
        except HypervisorError as error:
            raise WorkloadError(f"cannot stop {workload_id}: {error}") from None
        with self._lock:
            self._held.pop(workload_id, None)
            self._save()
        log.info("workload %s stopped: %s", workload_id, command.reason)

    def checkpoint(self, command: link.Checkpoint) -> None:
        workload_id = command.workload_id
        self._check_epoch(workload_id, command.epoch)

        def save() -> None:
            if self._hv.state(workload_id) is not GuestState.SHUTOFF:
                self._hv.managed_save(workload_id)

        try:
            self._on_engine(save)
        except HypervisorError as error:
            raise WorkloadError(f"cannot checkpoint {workload_id}: {error}") from None
        log.info("workload %s checkpointed to disk", workload_id)

    def evacuate(self, command: link.Evacuate) -> None:
        self._check_epoch(command.workload_id, command.epoch)
        # Moving a guest to another donor is the migration issue's work; refusing here
        # makes the coordinator fall back to a checkpoint (the ladder's next rung).
        raise WorkloadError("live migration is not available in this agent version")

    def _check_epoch(self, workload_id: str, epoch: int) -> None:
        with self._lock:
            held_epoch = self._held.get(workload_id)
        if held_epoch != epoch:
            raise WorkloadError(f"{workload_id} is not held here at epoch {epoch}")
