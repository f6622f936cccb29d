"""The agent's link to its coordinator: enroll once, then keep a Connect stream up.

Threads: `run` (the link thread) enrolls, opens the stream and reads commands; a
reporter thread sends a Report every interval and watches the lease; a command thread
carries out commands one at a time (an image download must not stall the reports).

The owner never waits on any of this: the engine protects the owner on its own thread
whether or not the coordinator answers. What the link adds on failure is fencing: when
no Ack has renewed the lease for its TTL, this donor can no longer prove it owns its
fleet guests, so the engine holds them paused until the coordinator answers again.
"""

from __future__ import annotations

import logging
import os
import platform
import queue
import random
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import psutil

from donor_app.agent.credentials import new_key_and_csr
from donor_app.agent.link.workloads import FleetWorkloads, WorkloadError
from donor_app.domain import link
from donor_app.domain.decision import Level
from donor_app.domain.guest import GuestState
from donor_app.domain.status import AgentStatus, LinkState, LinkStatus
from donor_app.proto import coordinator_serde as serde
from donor_app.proto.serde import moment
from donor_app.proto.v1 import coordinator_pb2 as pb
from donor_app.proto.v1 import coordinator_pb2_grpc as pb_grpc
from donor_app.settings.config import LinkConfig
from donor_app.settings.credentials import DonorCredentials
from donor_app.settings.secrets import CredentialStore

log = logging.getLogger(__name__)

AGENT_VERSION = "0.1.0"
CHUNK_BYTES = 1 << 20  # under the coordinator's message limit
BACKOFF_FIRST_S = 1.0
BACKOFF_MAX_S = 60.0
REFUSED_RETRY_S = 300.0  # revoked or a bad token: the admin must act; retry rarely
_ARCHES = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64"}


class Refused(Exception):
    """The coordinator said no in a way retrying will not fix (bad token, revoked)."""


def backoff_delays(
    first: float = BACKOFF_FIRST_S, cap: float = BACKOFF_MAX_S, rng: random.Random | None = None
) -> Iterator[float]:
    """Full-jitter exponential backoff: a fleet of donors restarting together after a
    coordinator outage must not reconnect in lockstep."""
    rng = rng or random.Random()
    ceiling = first
    while True:
        yield rng.uniform(first / 2, ceiling)
        ceiling = min(cap, ceiling * 2)


def capacity_now(status: AgentStatus | None, hostname_arch: str | None = None) -> link.Capacity:
    """What this donor may lend now, from the engine's latest decision."""
    arch = _ARCHES.get(hostname_arch or platform.machine(), "x86_64")
    memory_mib = max(1, psutil.virtual_memory().total // (1 << 20))
    if status is None:
        return link.Capacity(cores=os.cpu_count() or 1, memory_mib=memory_mib, arch=arch)
    decision = status.decision
    lending = decision.level in (Level.RUN, Level.THROTTLED)
    return link.Capacity(
        cores=os.cpu_count() or 1,
        memory_mib=memory_mib,
        arch=arch,
        lend_cpu_percent=decision.caps.cpu_percent if lending else 0.0,
        lend_memory_mib=min(memory_mib, decision.caps.memory_mib) if lending else 0,
        lend_until=decision.next_change if lending else None,
        idle=decision.level is Level.RUN,
    )


class CoordinatorLink:
    def __init__(
        self,
        config: LinkConfig,
        credentials: CredentialStore,
        workloads: FleetWorkloads,
        *,
        status: Callable[[], AgentStatus | None],
        set_link_status: Callable[[LinkStatus], None],
        hold_paused: Callable[[frozenset[str]], None],
        hostname: str | None = None,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self._config = config
        self._credentials = credentials
        self._workloads = workloads
        self._status = status
        self._set_link_status = set_link_status
        self._hold_paused = hold_paused
        self._hostname = hostname or socket.gethostname()
        self._clock = clock or (lambda: datetime.now(UTC))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="coordinator-link", daemon=True)
        self._link = LinkStatus(address=config.address, state=LinkState.DISCONNECTED)
        self._lease_until: datetime | None = None
        self._fenced = False
        self._call: Any = None  # the open Connect call, to cancel it on stop

    # --- life cycle ----------------------------------------------------------------------

    def start(self) -> None:
        self._publish(self._link)
        # Fleet guests found at start (the agent restarted, its guests ran on) wait
        # paused for the coordinator to renew their lease: while this agent was away the
        # lease may have run out and the workload restarted elsewhere — the first Ack
        # says it has not (a stale copy is fenced instead).
        held = self._workloads.names()
        if held:
            log.info("holding %d fleet guests paused until their lease is renewed", len(held))
            self._fenced = True
            self._hold_paused(held)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        call = self._call
        if call is not None:
            call.cancel()
        self._thread.join(timeout=10)

    def _publish(self, status: LinkStatus) -> None:
        self._link = status
        self._set_link_status(status)

    def _state(self, state: LinkState, detail: str = "", donor_id: str | None = None) -> None:
        self._publish(
            LinkStatus(
                address=self._config.address,
                state=state,
                detail=detail,
                donor_id=donor_id if donor_id is not None else self._link.donor_id,
            )
        )

    # --- enrollment ------------------------------------------------------------------------

    def _enroll(self) -> DonorCredentials:
        token = self._config.token
        if not token:
            raise Refused("not enrolled and no enrollment token configured")
        self._state(LinkState.ENROLLING)
        key_pem, csr_pem = new_key_and_csr()
        channel = grpc.secure_channel(
            self._config.enroll_address, grpc.ssl_channel_credentials(self._config.ca_pem)
        )
        try:
            reply: pb.EnrollResponse = pb_grpc.CoordinatorStub(channel).Enroll(
                pb.EnrollRequest(token=token, csr_pem=csr_pem, hostname=self._hostname),
                timeout=30,
            )
        except grpc.RpcError as error:
            if error.code() in (
                grpc.StatusCode.UNAUTHENTICATED,
                grpc.StatusCode.INVALID_ARGUMENT,
                grpc.StatusCode.PERMISSION_DENIED,
            ):
                raise Refused(f"enrollment refused: {error.details()}") from None
            raise
        finally:
            channel.close()
        creds = DonorCredentials(
            donor_id=reply.donor_id,
            key_pem=key_pem,
            cert_pem=reply.certificate_pem,
            ca_pem=reply.ca_certificate_pem,
            not_after=moment(reply.not_after),
        )
        self._credentials.save(creds)
        log.info(
            "enrolled with %s as donor %s; credentials in %s",
            self._config.address,
            creds.donor_id,
            self._credentials.location,
        )
        token_file = self._config.token_file
        if token_file is not None:
            # The token did its job; a copy left on disk could enroll an impostor.
            try:
                token_file.unlink(missing_ok=True)
            except OSError as error:
                log.warning("cannot remove the used token file %s: %s", token_file, error)
        return creds

    # --- the link thread -------------------------------------------------------------------

    def _run(self) -> None:
        delays = backoff_delays()
        while not self._stop.is_set():
            wait = next(delays)
            try:
                creds = self._credentials.load() or self._enroll()
                self._session(creds)
                delays = backoff_delays()  # a session that was up resets the backoff
                wait = next(delays)
            except Refused as refusal:
                log.error("coordinator link: %s", refusal)
                self._state(LinkState.REFUSED, str(refusal))
                wait = REFUSED_RETRY_S
            except grpc.RpcError as error:
                code, detail = error.code(), error.details() or ""
                if code in (grpc.StatusCode.UNAUTHENTICATED,) and "enroll" in detail:
                    log.warning("the coordinator does not know us (%s): enrolling again", detail)
                    self._credentials.delete()
                elif code is grpc.StatusCode.PERMISSION_DENIED:
                    self._state(LinkState.REFUSED, detail)
                    wait = REFUSED_RETRY_S
                    self._check_lease()
                    self._stop.wait(wait)
                    continue
                self._state(LinkState.DISCONNECTED, f"{code.name.lower()}: {detail}")
            except Exception as error:  # never let the link thread die
                log.exception("coordinator link failed")
                self._state(LinkState.DISCONNECTED, str(error))
            self._check_lease()
            self._stop.wait(wait)

    def _channel(self, creds: DonorCredentials) -> grpc.Channel:
        return grpc.secure_channel(
            self._config.address,
            grpc.ssl_channel_credentials(
                root_certificates=creds.ca_pem,
                private_key=creds.key_pem,
                certificate_chain=creds.cert_pem,
            ),
            options=[("grpc.keepalive_time_ms", 60_000)],
        )

    def _session(self, creds: DonorCredentials) -> None:
        channel = self._channel(creds)
        stub = pb_grpc.CoordinatorStub(channel)
        outbox: queue.Queue[pb.DonorEvent | None] = queue.Queue()
        commands: queue.Queue[link.Command | None] = queue.Queue()
        seq = iter(range(1, 1 << 62))
        interval = [5.0]
        ended = threading.Event()

        def send(message: link.DonorMessage) -> None:
            outbox.put(serde.event_to_proto(link.DonorEvent(next(seq), message)))

        def requests() -> Iterator[pb.DonorEvent]:
            while (item := outbox.get()) is not None:
                yield item

        send(link.Hello(AGENT_VERSION, capacity_now(self._status()), self._workloads.reports()))
        reporter = threading.Thread(
            target=self._report_loop,
            args=(send, interval, ended),
            name="coordinator-reports",
            daemon=True,
        )
        worker = threading.Thread(
            target=self._command_loop,
            args=(commands, send, stub),
            name="coordinator-commands",
            daemon=True,
        )
        call = stub.Connect(requests())
        self._call = call
        worker.start()
        try:
            for wire in call:
                command = serde.command_from_proto(wire)
                message = command.message
                if isinstance(message, link.Welcome):
                    interval[0] = float(max(1, message.report_interval_s))
                    # Without a keyring the key sits in a 0600 file: say so where the
                    # owner and the admin look (tray About/Settings, `status`).
                    where = self._credentials.location
                    detail = "" if "keyring" in where else f"credentials in {where}"
                    self._state(LinkState.CONNECTED, detail, donor_id=message.donor_id)
                    if not reporter.is_alive():
                        reporter.start()
                elif isinstance(message, link.Ack):
                    self._renewed(message.lease_until)
                else:
                    commands.put(command)
        finally:
            ended.set()
            self._call = None
            outbox.put(None)
            commands.put(None)
            channel.close()
            worker.join(timeout=5)

    def _renewed(self, lease_until: datetime) -> None:
        self._lease_until = lease_until
        if self._fenced:
            log.info("lease renewed: fleet guests follow the policy again")
            self._fenced = False
            self._hold_paused(frozenset())

    def _check_lease(self) -> None:
        if self._lease_until is None or self._fenced:
            return
        if self._clock() > self._lease_until:
            held = self._workloads.names()
            if held:
                log.warning("lease expired: holding %d fleet guests paused", len(held))
                self._hold_paused(held)
            self._fenced = True

    def _report_loop(
        self,
        send: Callable[[link.DonorMessage], None],
        interval: list[float],
        ended: threading.Event,
    ) -> None:
        reclaimed: set[str] = set()
        while not ended.wait(interval[0]) and not self._stop.is_set():
            status = self._status()
            reports = self._workloads.reports()
            send(
                link.Report(
                    capacity_now(status),
                    reports,
                    status.decision.level if status is not None else None,
                )
            )
            self._check_lease()
            # The owner stayed: ask the coordinator to move our fleet guests away (once
            # per episode; the answer is an Evacuate or a Checkpoint command).
            level = status.decision.level if status is not None else None
            if level in (Level.EVACUATE, Level.CHECKPOINT):
                ids = tuple(
                    r.workload_id
                    for r in reports
                    if r.workload_id not in reclaimed
                    and r.state in (GuestState.RUNNING, GuestState.PAUSED)
                )
                if ids:
                    send(link.Reclaim(ids, status.decision.cause.value if status else ""))
                    reclaimed.update(ids)
            else:
                reclaimed.clear()

    def _command_loop(
        self,
        commands: queue.Queue[link.Command | None],
        send: Callable[[link.DonorMessage], None],
        stub: pb_grpc.CoordinatorStub,
    ) -> None:
        images = _Images(stub)
        checkpoints = _Checkpoints(stub)
        while (command := commands.get()) is not None:
            message = command.message
            try:
                result = link.CommandResult(command.seq, True)
                if isinstance(message, link.RunWorkload):
                    self._workloads.run(message, images, checkpoints)
                elif isinstance(message, link.StopWorkload):
                    self._workloads.stop(message)
                elif isinstance(message, link.Checkpoint):
                    info = self._workloads.checkpoint(message, checkpoints)
                    result = replace(result, checkpoint=info)
                elif isinstance(message, link.PrepareMigration):
                    prepared = self._workloads.prepare(message, images)
                    result = replace(result, prepared=prepared)
                elif isinstance(message, link.Evacuate):
                    report = self._workloads.evacuate(message)
                    result = replace(result, migration=report)
                send(result)
            except WorkloadError as error:
                log.warning("command %d failed: %s", command.seq, error)
                send(link.CommandResult(command.seq, False, str(error)))
            except grpc.RpcError as error:
                send(link.CommandResult(command.seq, False, f"transfer: {error.details()}"))
            except Exception as error:
                log.exception("command %d failed", command.seq)
                send(link.CommandResult(command.seq, False, str(error)))


class _Images:
    def __init__(self, stub: pb_grpc.CoordinatorStub) -> None:
        self._stub = stub

    def fetch(self, sha256: str) -> Iterator[bytes]:
        for chunk in self._stub.FetchImage(pb.ImageRequest(sha256=sha256), timeout=600):
            yield chunk.data


class _Checkpoints:
    """PushCheckpoint / PullCheckpoint over the donor's mTLS channel."""

    def __init__(self, stub: pb_grpc.CoordinatorStub) -> None:
        self._stub = stub

    def push(self, workload_id: str, epoch: int, path: Path, sha256: str) -> link.CheckpointInfo:
        size = path.stat().st_size

        def chunks() -> Iterator[pb.CheckpointChunk]:
            yield pb.CheckpointChunk(
                workload_id=workload_id, epoch=epoch, sha256=sha256, total_size=size
            )
            with path.open("rb") as f:
                while block := f.read(CHUNK_BYTES):
                    yield pb.CheckpointChunk(data=block)

        reply = self._stub.PushCheckpoint(chunks(), timeout=600)
        return serde.checkpoint_from_proto(reply, "checkpoint")

    def pull(self, workload_id: str, epoch: int, sha256: str) -> Iterator[bytes]:
        request = pb.CheckpointRequest(workload_id=workload_id, epoch=epoch, sha256=sha256)
        for chunk in self._stub.PullCheckpoint(request, timeout=600):
            yield chunk.data
