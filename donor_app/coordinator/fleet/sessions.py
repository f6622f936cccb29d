"""Donors' connections: who may open one, one session per donor, and where each event a
donor sends goes (reports to the hot path, reclaims and command results to the moves).

Runs on the coordinator's loop, called by the Connect servicer for each event of a
donor's stream, in the order the donor sent them.
"""

from __future__ import annotations

import logging

from donor_app.coordinator.fleet.config import run_command
from donor_app.coordinator.fleet.moves import Moves
from donor_app.coordinator.fleet.reports import Reports
from donor_app.coordinator.fleet.session import Code, DonorSession, Refused
from donor_app.coordinator.fleet.state import FleetState
from donor_app.domain import link
from donor_app.domain.records import DonorRecord, WorkloadEvent, WorkloadState

log = logging.getLogger(__name__)


class Sessions:
    def __init__(self, state: FleetState, reports: Reports, moves: Moves) -> None:
        self._state = state
        self._reports = reports
        self._moves = moves

    async def check_donor(self, donor_id: str, cert_sha256: str) -> DonorRecord:
        """The enrolled, unrevoked donor holding this certificate, or Refused."""
        donor = await self._state.io(self._state.store.get_donor, donor_id)
        if donor is None:
            raise Refused(Code.UNAUTHENTICATED, f"donor {donor_id} is not enrolled here")
        if donor.revoked:
            raise Refused(Code.PERMISSION_DENIED, f"donor {donor_id} was revoked")
        if donor.cert_sha256 != cert_sha256:
            raise Refused(
                Code.UNAUTHENTICATED,
                f"donor {donor_id}: this certificate was replaced by a newer enrollment",
            )
        return donor

    async def open_session(self, donor_id: str, cert_sha256: str) -> DonorSession:
        """A new session for the donor (closing its previous one), greeted with Welcome."""
        state = self._state
        donor = await self.check_donor(donor_id, cert_sha256)
        state.donors[donor_id] = donor
        previous = state.sessions.get(donor_id)
        if previous is not None:
            previous.close(Refused(Code.ABORTED, "replaced by a newer connection"))
        session = DonorSession(donor_id=donor_id, hostname=donor.hostname, opened_at=state.clock())
        state.sessions[donor_id] = session
        session.send(
            link.Welcome(
                donor_id=donor_id,
                lease_ttl_s=int(state.config.lease_ttl.total_seconds()),
                report_interval_s=int(state.config.report_interval.total_seconds()),
            )
        )
        log.info("donor %s (%s) connected", donor_id, donor.hostname)
        return session

    def close_session(self, session: DonorSession) -> None:
        if self._state.sessions.get(session.donor_id) is session:
            del self._state.sessions[session.donor_id]
            log.info("donor %s disconnected", session.donor_id)

    async def on_event(self, session: DonorSession, event: link.DonorEvent) -> None:
        """Handle one event from a donor. Raises Refused for a protocol violation (the
        servicer ends the stream with it)."""
        message = event.message
        if not session.hello_seen and not isinstance(message, link.Hello):
            raise Refused(Code.FAILED_PRECONDITION, "the first event must be a hello")
        if isinstance(message, link.Hello):
            if session.hello_seen:
                raise Refused(Code.FAILED_PRECONDITION, "hello: sent twice on one stream")
            session.hello_seen = True
            self._reports.on_report(session, event.seq, message.capacity, message.guests, None)
            self._resend_assignments(session, {g.workload_id for g in message.guests})
        elif isinstance(message, link.Report):
            self._reports.on_report(
                session, event.seq, message.capacity, message.guests, message.level
            )
        elif isinstance(message, link.Reclaim):
            await self._moves.on_reclaim(session, message)
        else:
            await self._on_result(session, message)

    def _resend_assignments(self, session: DonorSession, reported: set[str]) -> None:
        """Commands can be lost with a broken stream: resend RunWorkload (idempotent on the
        donor) for assignments the donor does not report yet."""
        for record in self._state.held_by(session.donor_id):
            if record.workload_id not in reported and record.state is WorkloadState.ASSIGNED:
                session.send(run_command(record))

    async def _on_result(self, session: DonorSession, result: link.CommandResult) -> None:
        command = session.pending.pop(result.command_seq, None)
        if command is None:
            return
        if not result.ok:
            log.info("donor %s: command %s failed: %s", session.donor_id, command, result.error)
        state = self._state
        async with state.lock:
            if isinstance(command, link.PrepareMigration):
                await self._moves.on_prepared(command, result)
            elif isinstance(command, link.Evacuate):
                await self._moves.on_migrated(command, result)
            elif isinstance(command, link.Checkpoint):
                await self._moves.on_checkpointed(session, command, result)
            elif isinstance(command, link.StopWorkload) and not result.ok:
                # e.g. a guest still arriving: ask again when it is reported stopped.
                session.cleaned.discard((command.workload_id, command.epoch))
            elif isinstance(command, link.RunWorkload) and not result.ok:
                record = state.workloads.get(command.workload_id)
                if record is not None and record.epoch == command.epoch:
                    await state.write(
                        record,
                        event=WorkloadEvent(
                            record.workload_id,
                            state.clock(),
                            "failed",
                            session.donor_id,
                            record.epoch,
                            result.error,
                        ),
                        state=WorkloadState.FAILED,
                        detail=result.error,
                    )
