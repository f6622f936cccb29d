"""The Admin API's calls as its wire messages: one mTLS channel with the admin credential.

`AdminRpc` sends and returns coordinator.proto messages; errors become `AdminError` with
the coordinator's own message, so a caller can print one line. `AdminClient`
(`donor_app.coordinator.admin_client`, what the CLI uses) speaks domain types on top of
it; tests that exercise the wire contract itself use `AdminRpc` directly.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc

from donor_app.coordinator.images import CHUNK_BYTES
from donor_app.proto.v1 import coordinator_pb2 as pb
from donor_app.proto.v1 import coordinator_pb2_grpc as pb_grpc


class AdminError(Exception):
    """The coordinator refused or could not be reached; `code` is the gRPC status."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True, slots=True)
class AdminCredential:
    """The coordinator's CA (to verify it) and the admin's certificate and key (PEM)."""

    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes

    @classmethod
    def from_files(cls, ca: Path, cert: Path, key: Path) -> AdminCredential:
        """Read the three PEM files (OSError if one cannot be read)."""
        return cls(ca.read_bytes(), cert.read_bytes(), key.read_bytes())


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(CHUNK_BYTES):
            digest.update(block)
    return digest.hexdigest()


class AdminRpc:
    """The Admin API's calls, one method per RPC; thread-safe, as gRPC channels are."""

    def __init__(self, address: str, credential: AdminCredential, timeout_s: float = 30.0) -> None:
        self.address = address
        self._timeout = timeout_s
        creds = grpc.ssl_channel_credentials(
            root_certificates=credential.ca_pem,
            private_key=credential.key_pem,
            certificate_chain=credential.cert_pem,
        )
        self._channel = grpc.secure_channel(address, creds)
        self._stub = pb_grpc.AdminStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> AdminRpc:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def _error(self, error: grpc.RpcError) -> AdminError:
        code = error.code()
        if code is grpc.StatusCode.UNAVAILABLE:
            return AdminError(code, f"cannot reach the coordinator at {self.address}")
        return AdminError(code, error.details() or code.name)

    def create_token(self, ttl_s: int, uses: int, note: str = "") -> pb.CreateTokenResponse:
        try:
            reply: pb.CreateTokenResponse = self._stub.CreateEnrollmentToken(
                pb.CreateTokenRequest(ttl_s=ttl_s, uses=uses, note=note), timeout=self._timeout
            )
        except grpc.RpcError as error:
            raise self._error(error) from None
        return reply

    def upload_image(self, path: Path) -> str:
        """Upload a file; returns its sha256 (uploading a known image again is harmless)."""
        sha256 = _file_sha256(path)
        size = path.stat().st_size

        def chunks() -> Iterator[pb.ImageChunk]:
            with path.open("rb") as f:
                first = True
                while block := f.read(CHUNK_BYTES):
                    yield pb.ImageChunk(
                        sha256=sha256 if first else "",
                        total_size=size if first else 0,
                        data=block,
                    )
                    first = False

        try:
            reply: pb.ImageInfo = self._stub.UploadImage(chunks(), timeout=600)
        except grpc.RpcError as error:
            raise self._error(error) from None
        return reply.sha256

    def submit(self, spec: pb.WorkloadSpec) -> pb.Workload:
        try:
            reply: pb.Workload = self._stub.SubmitWorkload(
                pb.SubmitWorkloadRequest(spec=spec), timeout=self._timeout
            )
        except grpc.RpcError as error:
            raise self._error(error) from None
        return reply

    def workloads(self) -> list[pb.Workload]:
        try:
            reply: pb.ListWorkloadsResponse = self._stub.ListWorkloads(
                pb.ListWorkloadsRequest(), timeout=self._timeout
            )
        except grpc.RpcError as error:
            raise self._error(error) from None
        return list(reply.workloads)

    def cancel(self, workload_id: str) -> pb.Workload:
        try:
            reply: pb.Workload = self._stub.CancelWorkload(
                pb.WorkloadRef(id=workload_id), timeout=self._timeout
            )
        except grpc.RpcError as error:
            raise self._error(error) from None
        return reply

    def history(self, workload_id: str) -> pb.WorkloadHistoryResponse:
        try:
            reply: pb.WorkloadHistoryResponse = self._stub.WorkloadHistory(
                pb.WorkloadRef(id=workload_id), timeout=self._timeout
            )
        except grpc.RpcError as error:
            raise self._error(error) from None
        return reply

    def move(self, workload_id: str, target: str = "", cold: bool = False) -> pb.Workload:
        try:
            reply: pb.Workload = self._stub.MoveWorkload(
                pb.MoveWorkloadRequest(id=workload_id, target_donor_id=target, cold=cold),
                timeout=self._timeout,
            )
        except grpc.RpcError as error:
            raise self._error(error) from None
        return reply

    def donors(self) -> list[pb.Donor]:
        try:
            reply: pb.ListDonorsResponse = self._stub.ListDonors(
                pb.ListDonorsRequest(), timeout=self._timeout
            )
        except grpc.RpcError as error:
            raise self._error(error) from None
        return list(reply.donors)

    def drain(self, donor_id: str) -> pb.Donor:
        try:
            reply: pb.Donor = self._stub.DrainDonor(pb.DonorRef(id=donor_id), timeout=self._timeout)
        except grpc.RpcError as error:
            raise self._error(error) from None
        return reply

    def revoke(self, donor_id: str) -> pb.Donor:
        try:
            reply: pb.Donor = self._stub.RevokeDonor(
                pb.DonorRef(id=donor_id), timeout=self._timeout
            )
        except grpc.RpcError as error:
            raise self._error(error) from None
        return reply
