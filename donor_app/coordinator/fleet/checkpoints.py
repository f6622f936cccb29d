"""Checkpoints a donor uploads and downloads: only the donor holding a workload at an
epoch may give it a checkpoint or fetch its latest one.

Runs on the coordinator's loop, called by the PushCheckpoint and PullCheckpoint
servicers; `accept_checkpoint` takes the fleet lock to record the new checkpoint.
"""

from __future__ import annotations

from donor_app.coordinator.fleet.session import Code, Refused
from donor_app.coordinator.fleet.state import FleetState
from donor_app.domain import link
from donor_app.domain.records import HELD_STATES, WorkloadEvent, WorkloadRecord


class Checkpoints:
    def __init__(self, state: FleetState) -> None:
        self._state = state

    def holder_check(self, donor_id: str, workload_id: str, epoch: int) -> WorkloadRecord:
        """The workload, if `donor_id` holds it at `epoch`; Refused otherwise."""
        record = self._state.workloads.get(workload_id)
        if record is None:
            raise Refused(Code.NOT_FOUND, f"workload_id: no active workload {workload_id}")
        if record.donor_id != donor_id or record.epoch != epoch or record.state not in HELD_STATES:
            raise Refused(
                Code.PERMISSION_DENIED,
                f"workload {workload_id} is not held by donor {donor_id} at epoch {epoch}",
            )
        return record

    async def accept_checkpoint(
        self, donor_id: str, workload_id: str, epoch: int, sha256: str, size: int
    ) -> link.CheckpointInfo:
        """A checkpoint was uploaded and verified: it becomes the workload's latest (the
        previous one's file is removed)."""
        state = self._state
        async with state.lock:
            record = self.holder_check(donor_id, workload_id, epoch)
            now = state.clock()
            info = link.CheckpointInfo(sha256, size, epoch, now, donor_id)
            previous = record.checkpoint
            updated = await state.write(
                record,
                event=WorkloadEvent(
                    workload_id, now, "checkpoint", donor_id, epoch, f"{size / 2**20:.1f} MiB"
                ),
                checkpoint=info,
            )
            if updated is None:
                raise Refused(Code.ABORTED, f"workload {workload_id} changed; checkpoint dropped")
        if previous is not None and previous.sha256 != sha256:
            state.checkpoints.path(previous.sha256).unlink(missing_ok=True)
        return info

    def checkpoint_to_pull(
        self, donor_id: str, workload_id: str, epoch: int, sha256: str
    ) -> link.CheckpointInfo:
        """The checkpoint `donor_id` may download: the latest of a workload it holds."""
        record = self.holder_check(donor_id, workload_id, epoch)
        if record.checkpoint is None or record.checkpoint.sha256 != sha256:
            raise Refused(
                Code.NOT_FOUND, f"sha256: {sha256} is not the latest checkpoint of {workload_id}"
            )
        return record.checkpoint
