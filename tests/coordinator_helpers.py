"""Test helpers: a real coordinator on its own event-loop thread, and a raw donor.

The raw donor speaks the wire protocol directly over real mTLS so tests can send what a
well-behaved agent never would (a stale epoch, a workload never given, oversize events).
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import grpc

from donor_app.agent.credentials import new_key_and_csr
from donor_app.coordinator.admin_rpc import AdminCredential
from donor_app.coordinator.admin_rpc import AdminRpc as AdminClient
from donor_app.coordinator.connection_limits import ConnectionLimits
from donor_app.coordinator.fleet import FleetConfig
from donor_app.coordinator.server import CoordinatorServer, Endpoints, ServeOptions
from donor_app.domain import link
from donor_app.proto import coordinator_serde as serde
from donor_app.proto.serde import moment
from donor_app.proto.v1 import coordinator_pb2 as pb
from donor_app.proto.v1 import coordinator_pb2_grpc as pb_grpc
from donor_app.settings.credentials import DonorCredentials


@dataclass
class RunningCoordinator:
    server: CoordinatorServer
    endpoints: Endpoints
    loop: asyncio.AbstractEventLoop
    data_dir: Path

    @property
    def ca_pem(self) -> bytes:
        return self.endpoints.ca_file.read_bytes()

    def admin(self) -> AdminClient:
        return AdminClient(
            self.endpoints.address,
            AdminCredential.from_files(
                self.endpoints.ca_file,
                self.endpoints.admin_cert_file,
                self.endpoints.admin_key_file,
            ),
        )

    def run(self, coroutine: object) -> object:
        """Run a coroutine on the coordinator's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(30)  # type: ignore[arg-type]


@contextmanager
def running_coordinator(
    data_dir: Path,
    store_url: str | None = None,
    lease_ttl: timedelta = timedelta(seconds=30),
    report_interval: timedelta = timedelta(seconds=5),
    fleet: FleetConfig | None = None,
    listen: str = "127.0.0.1:0",
    enroll_listen: str = "127.0.0.1:0",
    limits: ConnectionLimits | None = None,
) -> Iterator[RunningCoordinator]:
    """`fleet` overrides lease_ttl/report_interval; fixed `listen` ports let a test
    restart the coordinator where donors expect it; `limits`: shorter connection
    deadlines than the shipped ones."""
    options = ServeOptions(
        data_dir=data_dir,
        listen=listen,
        enroll_listen=enroll_listen,
        metrics_listen="127.0.0.1:0",
        store_url=store_url,
        hostnames=("localhost", "127.0.0.1"),
        fleet=fleet or FleetConfig(lease_ttl=lease_ttl, report_interval=report_interval),
        limits=limits or ConnectionLimits(),
    )
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="coordinator-loop", daemon=True)
    thread.start()
    server = CoordinatorServer(options)
    try:
        endpoints = asyncio.run_coroutine_threadsafe(server.start(), loop).result(60)
        yield RunningCoordinator(server, endpoints, loop, data_dir)
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(0.5), loop).result(60)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def enroll(
    coordinator: RunningCoordinator, token: str, hostname: str = "test-host"
) -> DonorCredentials:
    key_pem, csr_pem = new_key_and_csr()
    with grpc.secure_channel(
        coordinator.endpoints.enroll_address, grpc.ssl_channel_credentials(coordinator.ca_pem)
    ) as channel:
        reply = pb_grpc.CoordinatorStub(channel).Enroll(
            pb.EnrollRequest(token=token, csr_pem=csr_pem, hostname=hostname), timeout=10
        )
    return DonorCredentials(
        reply.donor_id,
        key_pem,
        reply.certificate_pem,
        reply.ca_certificate_pem,
        moment(reply.not_after),
    )


def donor_channel(address: str, creds: DonorCredentials) -> grpc.Channel:
    return grpc.secure_channel(
        address,
        grpc.ssl_channel_credentials(creds.ca_pem, creds.key_pem, creds.cert_pem),
    )


def capacity(cpu: float = 100.0, memory_mib: int = 4096, idle: bool = True) -> link.Capacity:
    return link.Capacity(
        cores=4,
        memory_mib=8192,
        arch="x86_64",
        lend_cpu_percent=cpu,
        lend_memory_mib=memory_mib,
        idle=idle,
    )


class RawDonor:
    """A Connect stream driven by the test: `send` events, `next_command` with a deadline."""

    def __init__(self, address: str, creds: DonorCredentials) -> None:
        self.creds = creds
        self._channel = donor_channel(address, creds)
        self._out: queue.Queue[pb.DonorEvent | None] = queue.Queue()
        self._in: queue.Queue[pb.Command | grpc.RpcError | None] = queue.Queue()
        self._seq = 0
        self.error: grpc.RpcError | None = None
        stub = pb_grpc.CoordinatorStub(self._channel)
        self.stub = stub  # for the unary and streaming calls beside Connect
        self._call = stub.Connect(self._requests())
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _requests(self) -> Iterator[pb.DonorEvent]:
        while (item := self._out.get()) is not None:
            yield item

    def _read(self) -> None:
        try:
            for command in self._call:
                self._in.put(command)
            self._in.put(None)
        except grpc.RpcError as error:
            self.error = error
            self._in.put(error)

    def send_wire(self, event: pb.DonorEvent) -> None:
        self._out.put(event)

    def send(self, message: link.DonorMessage) -> int:
        self._seq += 1
        self._out.put(serde.event_to_proto(link.DonorEvent(self._seq, message)))
        return self._seq

    def hello(
        self, cap: link.Capacity | None = None, guests: tuple[link.GuestReport, ...] = ()
    ) -> int:
        return self.send(link.Hello("test", cap or capacity(), guests))

    def next_command(self, timeout: float = 10.0, skip_acks: bool = True) -> link.Command:
        """The next command (Welcome/Ack skipped unless asked); raises the stream's error."""
        while True:
            item = self._in.get(timeout=timeout)
            if isinstance(item, grpc.RpcError):
                raise item
            if item is None:
                raise EOFError("the coordinator ended the stream")
            command = serde.command_from_proto(item)
            if skip_acks and isinstance(command.message, (link.Ack, link.Welcome)):
                continue
            return command

    def wait_error(self, timeout: float = 10.0) -> grpc.RpcError:
        while True:
            item = self._in.get(timeout=timeout)
            if isinstance(item, grpc.RpcError):
                return item
            if item is None:
                raise EOFError("the stream ended without an error")

    def close(self) -> None:
        self._out.put(None)
        self._call.cancel()
        self._channel.close()
