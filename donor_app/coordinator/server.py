"""The coordinator process: TLS material, store, fleet, gRPC servers, health, metrics.

grpc.aio servers (thousands of open donor streams cost a coroutine each, not a thread)
on two ports with different credentials: the main port demands a client certificate
from our CA (donors and the admin), the enrollment port only authenticates the server
so a new donor can call Enroll. The enrollment port is public by design, so it is a
small TCP front (`tcp_front.py`: connections per peer and in all, a deadline for
silence) before a gRPC server of its own on loopback, with shorter idle and age limits
than the main port's. How many connections each port may hold comes from the process's
descriptor limit, raised to its hard limit at start (`connection_limits.py`); what a
burst of connections leaves on the heap is given back (`memory_trim.py`). On start
the actual ports are written to `endpoints.json` in the data dir so the admin CLI and
tests find them (port 0 picks a free port).
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import grpc
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

from donor_app.atomic_file import write_atomic
from donor_app.coordinator.connection_limits import (
    ConnectionLimits,
    budget,
    enroll_port_options,
    main_port_options,
    raise_fd_limit,
)
from donor_app.coordinator.fleet import Fleet, FleetConfig, utc_now
from donor_app.coordinator.gc_policy import freeze_periodically
from donor_app.coordinator.images import CHUNK_BYTES, ImageStore
from donor_app.coordinator.memory_trim import trim_after_growth
from donor_app.coordinator.metrics import Metrics
from donor_app.coordinator.servicers import AdminServicer, CoordinatorServicer
from donor_app.coordinator.store import default_sqlite_url, open_store
from donor_app.coordinator.store.ports import Store
from donor_app.coordinator.tcp_front import TcpFront
from donor_app.coordinator.tls_files import CoordinatorTls, prepare_tls
from donor_app.private_files import private_dir
from donor_app.proto.v1 import coordinator_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

ENDPOINTS_FILE = "endpoints.json"
# Image chunks are 1 MiB; anything much larger than one chunk is refused by gRPC itself.
MAX_MESSAGE_BYTES = CHUNK_BYTES + 64 * 1024
SERVICE_NAMES = ("donor.v1.Coordinator", "donor.v1.Admin")
# Where the enrollment front reaches its gRPC server: this host only.
ENROLL_BACKEND = "127.0.0.1:0"


@dataclass(frozen=True, slots=True)
class ServeOptions:
    data_dir: Path
    listen: str = "0.0.0.0:7443"
    enroll_listen: str = "0.0.0.0:7444"
    metrics_listen: str | None = "127.0.0.1:9464"
    store_url: str | None = None  # None: SQLite in the data dir
    hostnames: tuple[str, ...] = ("localhost",)
    fleet: FleetConfig = field(default_factory=FleetConfig)
    cert_validity: timedelta = timedelta(days=365)
    limits: ConnectionLimits = field(default_factory=ConnectionLimits)


@dataclass(frozen=True, slots=True)
class Endpoints:
    """Where a running coordinator answers; what `endpoints.json` holds."""

    address: str  # main port (mTLS): donors' Connect, FetchImage, Admin
    enroll_address: str
    metrics_port: int | None
    ca_file: Path
    admin_cert_file: Path
    admin_key_file: Path

    def to_json(self) -> str:
        return json.dumps(
            {
                "address": self.address,
                "enroll_address": self.enroll_address,
                "metrics_port": self.metrics_port,
                "ca_file": str(self.ca_file),
                "admin_cert_file": str(self.admin_cert_file),
                "admin_key_file": str(self.admin_key_file),
            },
            indent=2,
        )

    @classmethod
    def load(cls, data_dir: Path) -> Endpoints:
        """Raises FileNotFoundError (no coordinator ran there) or ValueError."""
        raw = json.loads((data_dir / ENDPOINTS_FILE).read_text())
        try:
            return cls(
                address=str(raw["address"]),
                enroll_address=str(raw["enroll_address"]),
                metrics_port=raw.get("metrics_port"),
                ca_file=Path(raw["ca_file"]),
                admin_cert_file=Path(raw["admin_cert_file"]),
                admin_key_file=Path(raw["admin_key_file"]),
            )
        except (KeyError, TypeError) as error:
            raise ValueError(f"{data_dir / ENDPOINTS_FILE}: missing {error}") from None


def _client_address(listen: str, port: int) -> str:
    host = listen.rsplit(":", 1)[0].strip("[]")
    if host in ("", "0.0.0.0", "::"):
        host = "localhost"
    return f"{host}:{port}"


def _split(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{listen!r} is not host:port")
    return host.strip("[]"), int(port)


class CoordinatorServer:
    def __init__(self, options: ServeOptions, store: Store | None = None) -> None:
        self.options = options
        self._store = store
        self.fleet: Fleet | None = None
        self.tls: CoordinatorTls | None = None
        self.metrics = Metrics()
        self._server: aio.Server | None = None
        self._enroll_server: aio.Server | None = None
        self.front: TcpFront | None = None
        self._health = HealthServicer()
        self.endpoints: Endpoints | None = None
        self._gc_task: asyncio.Task[None] | None = None
        self._trim_task: asyncio.Task[None] | None = None

    async def start(self) -> Endpoints:
        options = self.options
        for listen in (options.listen, options.enroll_listen):
            _split(listen)  # a bad address fails before anything is created
        data_dir = options.data_dir
        # Private: it holds the fleet's database, its CA and the guests' checkpoints.
        private_dir(data_dir)
        tls_dir = data_dir / "tls"
        self.tls = tls = await asyncio.to_thread(
            prepare_tls, tls_dir, list(options.hostnames), utc_now()
        )
        if self._store is None:
            url = options.store_url or default_sqlite_url(data_dir)
            self._store = await asyncio.to_thread(open_store, url)
        self.fleet = fleet = Fleet(self._store, ImageStore(data_dir / "images"), options.fleet)
        await fleet.start()
        self.metrics.watch_fleet(
            lambda: fleet.connected_donors,
            lambda: {state.value: n for state, n in fleet.workload_counts().items()},
        )

        plan = budget(options.limits, raise_fd_limit())
        messages = [
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ]
        server = aio.server(
            options=[
                *messages,
                # Find dead donors' connections (laptops closed mid-stream) in minutes.
                ("grpc.keepalive_time_ms", 60_000),
                ("grpc.keepalive_timeout_ms", 20_000),
                ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
                *main_port_options(options.limits, plan),
            ]
        )
        enroll_server = aio.server(options=[*messages, *enroll_port_options(options.limits, plan)])
        # Both servers answer the same services: on the enrollment port nobody has a
        # client certificate, so everything but Enroll and the health check is refused.
        coordinator = CoordinatorServicer(fleet, tls.ca, self.metrics, options.cert_validity)
        admin = AdminServicer(fleet, self.metrics)
        for each in (server, enroll_server):
            pb_grpc.add_CoordinatorServicer_to_server(coordinator, each)
            pb_grpc.add_AdminServicer_to_server(admin, each)
            health_pb2_grpc.add_HealthServicer_to_server(self._health, each)
        key_pair = [(tls.server_key_pem, tls.server_cert_pem)]
        main_port = server.add_secure_port(
            options.listen,
            grpc.ssl_server_credentials(
                key_pair, root_certificates=tls.ca_pem, require_client_auth=True
            ),
        )
        backend_port = enroll_server.add_secure_port(
            ENROLL_BACKEND, grpc.ssl_server_credentials(key_pair)
        )
        self.front = front = TcpFront(
            (_split(ENROLL_BACKEND)[0], backend_port),
            per_peer=plan.enroll_per_peer,
            total=plan.enroll_connections,
            silent_timeout_s=options.limits.silent_timeout_s,
        )
        enroll_port = await front.start(*_split(options.enroll_listen))
        await server.start()
        await enroll_server.start()
        self._server = server
        self._enroll_server = enroll_server
        log.info(
            "connections: main port up to %d, enrollment port up to %d (%d per peer)"
            " under a descriptor limit of %d",
            plan.main_connections,
            plan.enroll_connections,
            plan.enroll_per_peer,
            plan.fd_limit,
        )
        self._gc_task = asyncio.create_task(freeze_periodically())
        self._trim_task = asyncio.create_task(trim_after_growth())
        for name in ("", *SERVICE_NAMES):
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        metrics_port = None
        if options.metrics_listen:
            host, port = _split(options.metrics_listen)
            metrics_port = self.metrics.serve(host, port)
        self.endpoints = Endpoints(
            address=_client_address(options.listen, main_port),
            enroll_address=_client_address(options.enroll_listen, enroll_port),
            metrics_port=metrics_port,
            ca_file=tls.ca_cert_file,
            admin_cert_file=tls.admin_cert_file,
            admin_key_file=tls.admin_key_file,
        )
        write_atomic(data_dir / ENDPOINTS_FILE, self.endpoints.to_json().encode(), 0o644)
        log.info(
            "coordinator serving: donors and admin on %s (mTLS), enrollment on %s, metrics on %s",
            self.endpoints.address,
            self.endpoints.enroll_address,
            metrics_port,
        )
        return self.endpoints

    async def stop(self, grace_s: float = 2.0) -> None:
        await self._health.enter_graceful_shutdown()
        if self._gc_task is not None:
            self._gc_task.cancel()
            await asyncio.gather(self._gc_task, return_exceptions=True)
            gc.unfreeze()  # what was frozen can be collected again
        if self._trim_task is not None:
            self._trim_task.cancel()
            await asyncio.gather(self._trim_task, return_exceptions=True)
        if self.front is not None:
            await self.front.close()
        if self.fleet is not None:
            await self.fleet.stop()
        servers = [s for s in (self._server, self._enroll_server) if s is not None]
        await asyncio.gather(*(s.stop(grace_s) for s in servers))
        self.metrics.close()
        if self._store is not None:
            await asyncio.to_thread(self._store.close)
        log.info("coordinator stopped")


async def serve_until(options: ServeOptions, stop: asyncio.Event) -> None:
    server = CoordinatorServer(options)
    await server.start()
    try:
        await stop.wait()
    finally:
        await server.stop()
