"""Idle connections cannot take the coordinator down: a flood of TCP connections to the
enrollment port, more than the process has file descriptors, leaves the health check
and the admin port answering; the coordinator closes every idle connection within its
deadlines, and its memory comes back once the flood is over.

For the flood the coordinator runs as `donor-coordinator serve` in a child process whose
descriptor limit (soft and hard) is lowered to 256, so the flood is bounded and stays on
loopback. It comes from other loopback addresses (127.0.0.2…) than the health check and
the admin client (127.0.0.1), as an attacker's would. Then each bound on its own: the
main port's handshake deadline, the idle time of a connection without RPCs on both
ports, the enrollment front's limits (per peer, in all, silence) with a stand-in for
gRPC behind it, and when the heap is trimmed.
"""

from __future__ import annotations

import asyncio
import contextlib
import selectors
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from donor_app.coordinator import memory_trim
from donor_app.coordinator.admin_rpc import AdminCredential, AdminRpc
from donor_app.coordinator.connection_limits import ConnectionLimits
from donor_app.coordinator.server import Endpoints
from donor_app.coordinator.tcp_front import TcpFront, peer_key
from tests.coordinator_helpers import RunningCoordinator, running_coordinator
from tests.waiting import wait_for

pytestmark = pytest.mark.slow

FD_LIMIT = 256
# Several attackers, each with more connections than the per-peer limit, together far
# more than the process has descriptors.
SOURCES = [f"127.0.0.{n}" for n in range(2, 12)]
PER_SOURCE = 100
# The coordinator's documented bounds: a connection that sends nothing is closed after
# 5 s (enrollment port), one that has not finished its TLS handshake 10 s after it began
# (its first byte there, its accept on the main port) is closed. Margin: a loaded
# 2-core machine.
HANDSHAKE_DEADLINE_S = 10.0
MARGIN_S = 5.0
# What a flood may leave behind in the coordinator's memory once it is over.
RSS_BOUND_MIB = 24.0
# The start of a TLS ClientHello record, and then nothing: a slow client, not a silent one.
PARTIAL_HELLO = b"\x16\x03\x01\x02\x00\x01"

_CHILD = (
    "import resource, sys\n"
    f"resource.setrlimit(resource.RLIMIT_NOFILE, ({FD_LIMIT}, {FD_LIMIT}))\n"
    "from donor_app.coordinator.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


@pytest.fixture
def coordinator_process(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], Endpoints]]:
    data_dir = tmp_path / "coordinator"
    log = (tmp_path / "coordinator.log").open("wb")
    process = subprocess.Popen(
        [
            sys.executable,
            "-c",
            _CHILD,
            "--data-dir",
            str(data_dir),
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--enroll-listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=Path(__file__).resolve().parents[2],
    )
    try:

        def started() -> Endpoints | None:
            assert process.poll() is None, (tmp_path / "coordinator.log").read_text()
            try:
                return Endpoints.load(data_dir)
            except (FileNotFoundError, ValueError):
                return None

        yield process, wait_for(started, timeout=60, what="the coordinator to start")
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
        log.close()


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


def _health(endpoints: Endpoints) -> int:
    """SERVING's number, asked over a new connection with a 5 s deadline."""
    with grpc.secure_channel(
        endpoints.enroll_address,
        grpc.ssl_channel_credentials(endpoints.ca_file.read_bytes()),
    ) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="donor.v1.Coordinator"), timeout=5
        )
    return int(reply.status)


def _admin_answers(endpoints: Endpoints) -> bool:
    credential = AdminCredential.from_files(
        endpoints.ca_file, endpoints.admin_cert_file, endpoints.admin_key_file
    )
    with AdminRpc(endpoints.address, credential, timeout_s=5) as admin:
        admin.create_token(60, 1)
    return True


def _flood(address: str) -> list[socket.socket]:
    """Connect from every source without sending anything; the sockets that connected
    within 5 s (the others are still waiting in the kernel's queues, or were refused)."""
    host, port = _split(address)
    pending: list[socket.socket] = []
    for source in SOURCES:
        for _ in range(PER_SOURCE):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((source, 0))
            sock.setblocking(False)
            sock.connect_ex((host, port))
            pending.append(sock)
    connected: list[socket.socket] = []
    with selectors.DefaultSelector() as selector:
        for sock in pending:
            selector.register(sock, selectors.EVENT_WRITE)
        deadline = time.monotonic() + 5
        while selector.get_map() and time.monotonic() < deadline:
            for key, _ in selector.select(timeout=0.2):
                sock = key.fileobj  # type: ignore[assignment]
                selector.unregister(sock)
                if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                    connected.append(sock)
    return connected


def _closed_by_server(sock: socket.socket) -> bool:
    try:
        return sock.recv(4096) == b""
    except ConnectionResetError:
        return True
    except BlockingIOError:
        return False


def _wait_closed(socks: list[socket.socket], within_s: float, what: str) -> None:
    """Every socket closed (or reset) by the other side within the deadline."""
    for sock in socks:
        sock.setblocking(False)
    open_ = set(socks)

    def all_closed() -> bool:
        open_.difference_update([s for s in open_ if _closed_by_server(s)])
        return not open_

    try:
        wait_for(all_closed, timeout=within_s, what=what)
    except AssertionError:
        raise AssertionError(
            f"{len(open_)} of {len(socks)} connections still open after {within_s:.1f} s"
            f" waiting for {what}"
        ) from None


def _rss_mib(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / (1024 * 1024)


def test_an_idle_flood_leaves_the_coordinator_answering(
    coordinator_process: tuple[subprocess.Popen[bytes], Endpoints],
) -> None:
    process, endpoints = coordinator_process
    # Warm up what the first calls allocate, so the RSS baseline is the steady one.
    for _ in range(3):
        assert _health(endpoints) == health_pb2.HealthCheckResponse.SERVING
        assert _admin_answers(endpoints)
    rss_before = _rss_mib(process.pid)

    flood = _flood(endpoints.enroll_address)
    try:
        assert len(flood) > FD_LIMIT // 4, "the flood did not reach the coordinator"
        # A few of those still open become slow clients rather than silent ones.
        slow = [s for s in flood if not _closed_by_server(s)][:4]
        for sock in slow:
            with contextlib.suppress(OSError):
                sock.send(PARTIAL_HELLO)
        flooded_at = time.monotonic()

        # While the flood is on: new clients from elsewhere are still served.
        assert _health(endpoints) == health_pb2.HealthCheckResponse.SERVING
        assert _admin_answers(endpoints)
        assert process.poll() is None

        # Every idle connection is closed by the coordinator within its deadline.
        remaining = HANDSHAKE_DEADLINE_S + MARGIN_S - (time.monotonic() - flooded_at)
        _wait_closed(flood, max(remaining, 0.1), "the flood's connections closed")
    finally:
        for sock in flood:
            sock.close()

    # Served after the flood, and its memory back within the bound.
    assert _health(endpoints) == health_pb2.HealthCheckResponse.SERVING
    assert _admin_answers(endpoints)
    wait_for(
        lambda: _rss_mib(process.pid) <= rss_before + RSS_BOUND_MIB,
        timeout=10,
        what=f"the coordinator's RSS back within {RSS_BOUND_MIB} MiB of {rss_before:.0f} MiB",
    )
    assert process.poll() is None


# --- each deadline on its own ----------------------------------------------------------------


def test_the_main_port_closes_a_connection_that_never_starts_its_handshake(
    coordinator: RunningCoordinator,
) -> None:
    host, port = _split(coordinator.endpoints.address)
    silent = [socket.create_connection((host, port), timeout=5) for _ in range(3)]
    try:
        _wait_closed(
            silent,
            HANDSHAKE_DEADLINE_S + MARGIN_S,
            "the main port to close connections that sent nothing",
        )
    finally:
        for sock in silent:
            sock.close()


def _http2_idle_closed(address: str, ca: Path, cert: tuple[Path, Path] | None) -> float:
    """Finish TLS (ALPN h2) and the HTTP/2 preface, then start no RPC: the seconds until
    the server closed the connection; fails unless it said GOAWAY first."""
    context = ssl.create_default_context(cafile=str(ca))
    context.set_alpn_protocols(["h2"])
    if cert is not None:
        context.load_cert_chain(str(cert[0]), str(cert[1]))
    host, port = _split(address)
    with (
        socket.create_connection((host, port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        tls.sendall(H2_PREFACE + H2_EMPTY_SETTINGS)
        started = time.monotonic()
        tls.settimeout(IDLE_S + MARGIN_S)
        received = b""
        while chunk := tls.recv(65536):
            received += chunk
        elapsed = time.monotonic() - started
    assert _frame_types(received) >= {H2_SETTINGS, H2_GOAWAY}, received[:64]
    return elapsed


def _frame_types(data: bytes) -> set[int]:
    types = set()
    while len(data) >= 9:
        length = int.from_bytes(data[:3], "big")
        types.add(data[3])
        data = data[9 + length :]
    return types


H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
H2_EMPTY_SETTINGS = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
H2_SETTINGS = 0x4
H2_GOAWAY = 0x7
IDLE_S = 1.0


def test_a_connection_without_rpcs_is_closed_after_the_idle_time(tmp_path: Path) -> None:
    limits = ConnectionLimits(main_idle_s=IDLE_S, enroll_idle_s=IDLE_S)
    with running_coordinator(tmp_path / "coordinator", limits=limits) as coordinator:
        endpoints = coordinator.endpoints
        enroll_s = _http2_idle_closed(endpoints.enroll_address, endpoints.ca_file, None)
        admin = (endpoints.admin_cert_file, endpoints.admin_key_file)
        main_s = _http2_idle_closed(endpoints.address, endpoints.ca_file, admin)
    assert enroll_s < IDLE_S + MARGIN_S
    assert main_s < IDLE_S + MARGIN_S


# --- the enrollment front on its own -------------------------------------------------------


async def _upper_echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data.upper())
        await writer.drain()
    writer.close()


@asynccontextmanager
async def _front(
    per_peer: int = 4, total: int = 8, silent_timeout_s: float = 30.0
) -> AsyncIterator[tuple[TcpFront, int]]:
    backend = await asyncio.start_server(_upper_echo, "127.0.0.1", 0)
    backend_port = backend.sockets[0].getsockname()[1]
    front = TcpFront(("127.0.0.1", backend_port), per_peer, total, silent_timeout_s)
    port = await front.start("127.0.0.1", 0)
    try:
        yield front, port
    finally:
        await front.close()
        backend.close()
        await backend.wait_closed()


async def _connect(
    port: int, source: str = "127.0.0.1"
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))


async def _closed(reader: asyncio.StreamReader, within_s: float) -> bool:
    """True if the other side closed (EOF or reset) within the deadline."""
    try:
        return await asyncio.wait_for(reader.read(1), within_s) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


async def _refused(port: int, source: str) -> bool:
    """Connecting is answered with a reset or a close (the reset may beat the connect)."""
    try:
        reader, _ = await _connect(port, source)
    except ConnectionResetError:
        return True
    return await _closed(reader, 5)


async def _round_trip(port: int, payload: bytes, source: str = "127.0.0.1") -> bytes:
    reader, writer = await _connect(port, source)
    writer.write(payload)
    await writer.drain()
    back = await asyncio.wait_for(reader.readexactly(len(payload)), 10)
    writer.close()
    return back


def test_the_front_carries_bytes_both_ways() -> None:
    async def scenario() -> None:
        async with _front() as (_, port):
            assert await _round_trip(port, b"hello") == b"HELLO"
            # More than any socket buffer holds: both directions must pause and resume.
            big = bytes(range(97, 123)) * 200_000
            assert await _round_trip(port, big) == big.upper()

    asyncio.run(scenario())


def test_a_peer_over_its_share_is_refused_and_others_still_get_in() -> None:
    async def scenario() -> None:
        async with _front(per_peer=2, total=8) as (front, port):
            held = [await _connect(port, "127.0.0.2") for _ in range(2)]
            assert await _refused(port, "127.0.0.2")
            assert front.counts.over_peer == 1
            assert not await _closed(held[0][0], 0.2)
            assert await _round_trip(port, b"other", "127.0.0.3") == b"OTHER"

    asyncio.run(scenario())


def test_a_full_front_closes_the_oldest_silent_connection_for_a_new_one() -> None:
    async def scenario() -> None:
        async with _front(per_peer=8, total=2) as (front, port):
            oldest, _ = await _connect(port, "127.0.0.2")
            speaking, writer = await _connect(port, "127.0.0.3")
            writer.write(b"x")
            assert await asyncio.wait_for(speaking.readexactly(1), 5) == b"X"
            # Full: the newcomer gets the place of the one that never spoke.
            assert await _round_trip(port, b"new", "127.0.0.4") == b"NEW"
            assert await _closed(oldest, 5)
            assert front.counts.evicted == 1
            assert not await _closed(speaking, 0.2)

    asyncio.run(scenario())


def test_a_silent_connection_is_closed_at_its_deadline() -> None:
    async def scenario() -> None:
        async with _front(silent_timeout_s=0.3) as (front, port):
            reader, _ = await _connect(port)
            assert await _closed(reader, 0.3 + MARGIN_S)
            assert front.counts.silent == 1
            assert front.open_connections == 0

    asyncio.run(scenario())


def test_peers_are_counted_by_address_and_ipv6_by_64() -> None:
    assert peer_key("192.0.2.7") == "192.0.2.7"
    assert peer_key("::ffff:192.0.2.7") == "192.0.2.7"
    assert peer_key("2001:db8:1:2:aaaa::1") == peer_key("2001:db8:1:2:bbbb::9")
    assert peer_key("2001:db8:1:2::1") == "2001:db8:1:2::/64"
    assert peer_key("2001:db8:1:3::1") != peer_key("2001:db8:1:2::1")


# --- the heap given back ---------------------------------------------------------------------


class _Done(Exception):
    pass


def test_the_heap_is_trimmed_once_per_growth(monkeypatch: pytest.MonkeyPatch) -> None:
    readings = iter([100.0, 110.0, 140.0, 100.0, 120.0, 131.0, 150.0, 100.0])
    trims: list[float] = []

    def rss() -> float:
        for reading in readings:
            return reading
        raise _Done

    monkeypatch.setattr(memory_trim, "rss_mib", rss)
    monkeypatch.setattr(memory_trim, "_malloc_trim", lambda: lambda: trims.append(1.0))

    async def scenario() -> None:
        with contextlib.suppress(_Done):
            await memory_trim.trim_after_growth(check_s=0, growth_mib=32)

    asyncio.run(scenario())
    # 100 → 110 → 140 (+40 over the floor: trim, down to 100) → 120 → 131 (+31: no) →
    # 150 (+50 over 100: trim, down to 100).
    assert len(trims) == 2


def test_the_heap_trim_is_glibc_malloc_trim_here() -> None:
    # The coordinator runs on Linux with glibc: the trim must be found, not skipped.
    assert memory_trim._malloc_trim() is not None
    assert memory_trim.rss_mib() is not None
