"""Thin gRPC servicers over the fleet: check who calls, convert, call, convert back.

Who calls comes from the TLS layer: on the main port every caller has a certificate
signed by our CA (the handshake refuses anyone else); on the enrollment port nobody
has one, so every RPC but Enroll answers UNAUTHENTICATED there.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from typing import Any, NoReturn, TypeVar

import grpc
from grpc import aio

from donor_app.coordinator.ca import CertificateAuthority
from donor_app.coordinator.enroll import enroll
from donor_app.coordinator.fleet import Fleet
from donor_app.coordinator.fleet.session import Code, DonorSession, Refused
from donor_app.coordinator.identity import Identity, identity_from_auth_context
from donor_app.coordinator.images import ImageStore, ImageUploadError, Upload, check_sha256
from donor_app.coordinator.metrics import Metrics
from donor_app.coordinator.tokens import new_token
from donor_app.proto import admin_serde, spec_serde
from donor_app.proto import coordinator_serde as serde
from donor_app.proto.checks import WireError, identifier
from donor_app.proto.serde import timestamp
from donor_app.proto.v1 import coordinator_pb2 as pb
from donor_app.proto.v1 import coordinator_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

_Reply = TypeVar("_Reply")
_Chunk = TypeVar("_Chunk", pb.ImageChunk, pb.CheckpointChunk)

STATUS = {
    Code.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    Code.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    Code.PERMISSION_DENIED: grpc.StatusCode.PERMISSION_DENIED,
    Code.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    Code.ALREADY_EXISTS: grpc.StatusCode.ALREADY_EXISTS,
    Code.FAILED_PRECONDITION: grpc.StatusCode.FAILED_PRECONDITION,
    Code.ABORTED: grpc.StatusCode.ABORTED,
    Code.RESOURCE_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
}

# Connect events are small (a report with up to 256 guests is a few KiB); the server's
# message limit is sized for 1 MiB image chunks, so the stream gets its own, tighter one.
MAX_EVENT_BYTES = 64 * 1024
# Reports come every few seconds; a donor sending more than this many events within one
# second is broken or hostile.
MAX_EVENTS_PER_SECOND = 50


def caller(context: aio.ServicerContext[Any, Any]) -> Identity | None:
    return identity_from_auth_context(
        {key: list(values) for key, values in context.auth_context().items()}
    )


async def refuse(context: aio.ServicerContext[Any, Any], refusal: Refused) -> NoReturn:
    await context.abort(STATUS[refusal.code], refusal.message)
    raise AssertionError("abort returns only by raising")


def _timed(
    metrics: Metrics, method: str, call: Callable[[], Awaitable[_Reply]]
) -> Awaitable[_Reply]:
    async def run() -> _Reply:
        started = time.perf_counter()
        try:
            return await call()
        finally:
            metrics.rpc_seconds.labels(method).observe(time.perf_counter() - started)

    return run()


class CoordinatorServicer(pb_grpc.CoordinatorServicer):
    def __init__(
        self, fleet: Fleet, ca: CertificateAuthority, metrics: Metrics, cert_validity: timedelta
    ) -> None:
        self._fleet = fleet
        self._ca = ca
        self._metrics = metrics
        self._cert_validity = cert_validity

    async def Enroll(
        self, request: pb.EnrollRequest, context: aio.ServicerContext[Any, Any]
    ) -> pb.EnrollResponse:
        async def call() -> pb.EnrollResponse:
            try:
                enrolled = await enroll(
                    self._fleet,
                    self._ca,
                    token=request.token,
                    csr_pem=request.csr_pem,
                    hostname=request.hostname,
                    now=self._fleet.now(),
                    valid_for=self._cert_validity,
                )
            except Refused as refusal:
                log.warning("enrollment refused (%s): %s", context.peer(), refusal.message)
                await refuse(context, refusal)
            log.info("donor %s enrolled (%s)", enrolled.donor_id, request.hostname)
            return pb.EnrollResponse(
                donor_id=enrolled.donor_id,
                certificate_pem=enrolled.certificate.cert_pem,
                ca_certificate_pem=self._ca.cert_pem,
                not_after=timestamp(enrolled.certificate.not_after),
            )

        return await _timed(self._metrics, "Enroll", call)

    async def _donor(self, context: aio.ServicerContext[Any, Any]) -> Identity:
        identity = caller(context)
        if identity is None:
            await refuse(
                context,
                Refused(Code.UNAUTHENTICATED, "a donor certificate is required: enroll first"),
            )
        if identity.role != "donor" or identity.donor_id is None:
            await refuse(context, Refused(Code.PERMISSION_DENIED, "only donors may call this"))
        return identity

    async def Connect(
        self,
        request_iterator: AsyncIterator[pb.DonorEvent],
        context: aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[pb.Command]:
        identity = await self._donor(context)
        assert identity.donor_id is not None
        try:
            session = await self._fleet.open_session(identity.donor_id, identity.cert_sha256)
        except Refused as refusal:
            await refuse(context, refusal)
        reader = asyncio.create_task(self._read(session, request_iterator))
        try:
            while (command := await session.outbox.get()) is not None:
                yield serde.command_to_proto(command)
        finally:
            reader.cancel()
            self._fleet.close_session(session)
        if session.refusal is not None:
            log.info("donor %s stream ended: %s", identity.donor_id, session.refusal.message)
            context.set_code(STATUS[session.refusal.code])
            context.set_details(session.refusal.message)

    async def _read(self, session: DonorSession, events: AsyncIterator[pb.DonorEvent]) -> None:
        window_start, window_count = time.monotonic(), 0
        try:
            async for wire in events:
                started = time.perf_counter()
                if started - window_start >= 1.0:
                    window_start, window_count = started, 0
                window_count += 1
                if window_count > MAX_EVENTS_PER_SECOND:
                    raise Refused(
                        Code.RESOURCE_EXHAUSTED,
                        f"more than {MAX_EVENTS_PER_SECOND} events in one second",
                    )
                if wire.ByteSize() > MAX_EVENT_BYTES:
                    raise Refused(
                        Code.INVALID_ARGUMENT,
                        f"event {wire.seq}: larger than {MAX_EVENT_BYTES} bytes",
                    )
                try:
                    event = serde.event_from_proto(wire)
                except WireError as error:
                    raise Refused(Code.INVALID_ARGUMENT, str(error)) from None
                await self._fleet.on_event(session, event)
                self._metrics.event_seconds.labels(type(event.message).__name__).observe(
                    time.perf_counter() - started
                )
            session.finish()
        except Refused as refusal:
            log.warning("donor %s refused: %s", session.donor_id, refusal.message)
            session.close(refusal)
        except asyncio.CancelledError:
            raise
        except Exception:  # the stream broke (the donor vanished): end the session
            log.debug("donor %s stream broke", session.donor_id, exc_info=True)
            session.finish()

    async def FetchImage(
        self, request: pb.ImageRequest, context: aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.ImageChunk]:
        identity = await self._donor(context)
        assert identity.donor_id is not None
        try:
            await self._fleet.check_donor(identity.donor_id, identity.cert_sha256)
            sha256 = check_sha256(request.sha256)
        except Refused as refusal:
            await refuse(context, refusal)
        except ImageUploadError as error:
            await refuse(context, Refused(Code.INVALID_ARGUMENT, str(error)))
        images = self._fleet.images
        if not images.has(sha256):
            await refuse(context, Refused(Code.NOT_FOUND, f"sha256: no image {sha256}"))
        size = images.size(sha256)
        async for block in _blocks(images, sha256, request.offset, context):
            yield pb.ImageChunk(sha256=sha256, total_size=size, data=block)

    async def PushCheckpoint(
        self,
        request_iterator: AsyncIterator[pb.CheckpointChunk],
        context: aio.ServicerContext[Any, Any],
    ) -> pb.CheckpointInfo:
        identity = await self._donor(context)
        assert identity.donor_id is not None
        donor_id = identity.donor_id
        header: list[pb.CheckpointChunk] = []

        def begin(chunk: pb.CheckpointChunk) -> None:
            identifier("workload_id", chunk.workload_id)
            # Refused before a byte is stored: only the holder at this epoch may push.
            self._fleet.holder_check(donor_id, chunk.workload_id, chunk.epoch)
            header.append(chunk)

        try:
            await self._fleet.check_donor(donor_id, identity.cert_sha256)
            sha256, size = await receive_upload(self._fleet.checkpoints, request_iterator, begin)
            first = header[0]
            try:
                info = await self._fleet.accept_checkpoint(
                    donor_id, first.workload_id, first.epoch, sha256, size
                )
            except Refused:
                # The workload changed hands while its checkpoint was on its way: the
                # file is nobody's checkpoint, and it holds a guest's memory.
                await self._drop_unused_checkpoint(sha256)
                raise
        except Refused as refusal:
            await refuse(context, refusal)
        except WireError as error:
            await refuse(context, Refused(Code.INVALID_ARGUMENT, str(error)))
        return serde.checkpoint_to_proto(info)

    async def _drop_unused_checkpoint(self, sha256: str) -> None:
        """Remove a stored checkpoint that no workload names (the same bytes may be
        another's checkpoint already: files are named by their content)."""
        workloads = await self._fleet.list_workloads()
        if any(w.checkpoint is not None and w.checkpoint.sha256 == sha256 for w in workloads):
            return
        self._fleet.checkpoints.path(sha256).unlink(missing_ok=True)
        log.info("checkpoint %s dropped: its workload changed during the upload", sha256[:12])

    async def PullCheckpoint(
        self, request: pb.CheckpointRequest, context: aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.CheckpointChunk]:
        identity = await self._donor(context)
        assert identity.donor_id is not None
        try:
            await self._fleet.check_donor(identity.donor_id, identity.cert_sha256)
            info = self._fleet.checkpoint_to_pull(
                identity.donor_id, request.workload_id, request.epoch, request.sha256
            )
        except Refused as refusal:
            await refuse(context, refusal)
        store = self._fleet.checkpoints
        if not store.has(info.sha256):
            await refuse(
                context, Refused(Code.NOT_FOUND, f"sha256: checkpoint {info.sha256} is gone")
            )
        async for block in _blocks(store, info.sha256, request.offset, context):
            yield pb.CheckpointChunk(
                workload_id=request.workload_id,
                epoch=info.epoch,
                sha256=info.sha256,
                total_size=info.size,
                data=block,
            )


async def _blocks(
    store: ImageStore, sha256: str, offset: int, context: aio.ServicerContext[Any, Any]
) -> AsyncIterator[bytes]:
    """A stored file's bytes from `offset`, read off the event loop."""
    size = store.size(sha256)
    if offset > size:
        await context.abort(
            grpc.StatusCode.OUT_OF_RANGE, f"offset: {offset} is past the end ({size})"
        )
    chunks = store.read(sha256, offset)
    while (block := await asyncio.to_thread(next, chunks, None)) is not None:
        yield block


async def receive_upload(
    store: ImageStore, chunks: AsyncIterator[_Chunk], begin: Callable[[_Chunk], None]
) -> tuple[str, int]:
    """Store an upload's chunks (`begin` checks the first one, then its sha256 and size
    are announced), verify it, return its (sha256, size). Refused INVALID_ARGUMENT naming
    the field when it is not what it claimed. Whatever ends it early (a refusal, a
    broken stream, a cancelled RPC) leaves nothing in the store."""
    upload: Upload | None = None
    try:
        async for chunk in chunks:
            if upload is None:
                begin(chunk)
                # On the loop, not a worker: a cancel while a worker made the file
                # would leave it behind unnamed.
                upload = store.upload()
                upload.begin(chunk.sha256, chunk.total_size)
            await asyncio.to_thread(upload.write, chunk.data)
        if upload is None:
            raise ImageUploadError("data: the upload was empty")
        return upload.expected_sha256, await asyncio.to_thread(upload.finish)
    except ImageUploadError as error:
        raise Refused(Code.INVALID_ARGUMENT, str(error)) from None
    finally:
        if upload is not None:
            upload.abort()  # nothing to do once finished


class AdminServicer(pb_grpc.AdminServicer):
    def __init__(self, fleet: Fleet, metrics: Metrics) -> None:
        self._fleet = fleet
        self._metrics = metrics

    async def _admin(self, context: aio.ServicerContext[Any, Any]) -> None:
        identity = caller(context)
        if identity is None:
            await refuse(context, Refused(Code.UNAUTHENTICATED, "the admin credential is required"))
        if identity.role != "admin":
            await refuse(
                context, Refused(Code.PERMISSION_DENIED, "the admin credential is required")
            )

    async def _run(
        self,
        method: str,
        context: aio.ServicerContext[Any, Any],
        call: Callable[[], Awaitable[_Reply]],
    ) -> _Reply:
        async def checked() -> _Reply:
            await self._admin(context)
            try:
                return await call()
            except Refused as refusal:
                await refuse(context, refusal)
            except WireError as error:
                await refuse(context, Refused(Code.INVALID_ARGUMENT, str(error)))

        return await _timed(self._metrics, method, checked)

    async def CreateEnrollmentToken(
        self, request: pb.CreateTokenRequest, context: aio.ServicerContext[Any, Any]
    ) -> pb.CreateTokenResponse:
        async def call() -> pb.CreateTokenResponse:
            ttl = timedelta(seconds=request.ttl_s or 3600)
            try:
                text, record = new_token(
                    self._fleet.now(), ttl, request.uses or 1, request.note[:200]
                )
            except ValueError as error:
                raise Refused(Code.INVALID_ARGUMENT, str(error)) from None
            await asyncio.to_thread(self._fleet.store.add_token, record)
            log.info("enrollment token %s created (%d uses)", record.token_id, record.uses_left)
            return pb.CreateTokenResponse(
                token=text, expires_at=timestamp(record.expires_at), uses=record.uses_left
            )

        return await self._run("CreateEnrollmentToken", context, call)

    async def UploadImage(
        self, request_iterator: AsyncIterator[pb.ImageChunk], context: aio.ServicerContext[Any, Any]
    ) -> pb.ImageInfo:
        async def call() -> pb.ImageInfo:
            sha256, size = await receive_upload(
                self._fleet.images, request_iterator, lambda chunk: None
            )
            await self._fleet.add_image(sha256, size)
            return pb.ImageInfo(sha256=sha256, size=size)

        return await self._run("UploadImage", context, call)

    async def SubmitWorkload(
        self, request: pb.SubmitWorkloadRequest, context: aio.ServicerContext[Any, Any]
    ) -> pb.Workload:
        async def call() -> pb.Workload:
            spec, priority = spec_serde.spec_from_proto(request.spec)
            return admin_serde.workload_to_proto(await self._fleet.submit(spec, priority))

        return await self._run("SubmitWorkload", context, call)

    async def ListWorkloads(
        self, request: pb.ListWorkloadsRequest, context: aio.ServicerContext[Any, Any]
    ) -> pb.ListWorkloadsResponse:
        async def call() -> pb.ListWorkloadsResponse:
            records = await self._fleet.list_workloads()
            return pb.ListWorkloadsResponse(
                workloads=[admin_serde.workload_to_proto(r) for r in records]
            )

        return await self._run("ListWorkloads", context, call)

    async def WorkloadHistory(
        self, request: pb.WorkloadRef, context: aio.ServicerContext[Any, Any]
    ) -> pb.WorkloadHistoryResponse:
        async def call() -> pb.WorkloadHistoryResponse:
            record, events = await self._fleet.history(request.id)
            return pb.WorkloadHistoryResponse(
                workload=admin_serde.workload_to_proto(record),
                events=[admin_serde.workload_event_to_proto(e) for e in events],
            )

        return await self._run("WorkloadHistory", context, call)

    async def MoveWorkload(
        self, request: pb.MoveWorkloadRequest, context: aio.ServicerContext[Any, Any]
    ) -> pb.Workload:
        async def call() -> pb.Workload:
            record = await self._fleet.move(
                request.id, request.target_donor_id or None, cold=request.cold
            )
            return admin_serde.workload_to_proto(record)

        return await self._run("MoveWorkload", context, call)

    async def CancelWorkload(
        self, request: pb.WorkloadRef, context: aio.ServicerContext[Any, Any]
    ) -> pb.Workload:
        async def call() -> pb.Workload:
            return admin_serde.workload_to_proto(await self._fleet.cancel(request.id))

        return await self._run("CancelWorkload", context, call)

    def _donor_view(self, record: Any, held: dict[str, list[str]]) -> pb.Donor:
        return admin_serde.donor_to_proto(
            record,
            connected=self._fleet.is_connected(record.donor_id),
            workload_ids=held.get(record.donor_id, []),
        )

    async def ListDonors(
        self, request: pb.ListDonorsRequest, context: aio.ServicerContext[Any, Any]
    ) -> pb.ListDonorsResponse:
        async def call() -> pb.ListDonorsResponse:
            held = self._fleet.donor_workload_ids()
            donors = await self._fleet.list_donors()
            return pb.ListDonorsResponse(donors=[self._donor_view(d, held) for d in donors])

        return await self._run("ListDonors", context, call)

    async def DrainDonor(
        self, request: pb.DonorRef, context: aio.ServicerContext[Any, Any]
    ) -> pb.Donor:
        async def call() -> pb.Donor:
            donor = await self._fleet.drain(request.id)
            return self._donor_view(donor, self._fleet.donor_workload_ids())

        return await self._run("DrainDonor", context, call)

    async def RevokeDonor(
        self, request: pb.DonorRef, context: aio.ServicerContext[Any, Any]
    ) -> pb.Donor:
        async def call() -> pb.Donor:
            donor = await self._fleet.revoke(request.id)
            return self._donor_view(donor, self._fleet.donor_workload_ids())

        return await self._run("RevokeDonor", context, call)
