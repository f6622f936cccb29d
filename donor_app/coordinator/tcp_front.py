"""The enrollment port's TCP front: a cap per peer, a cap in all, a deadline for silence.

The enrollment port must be open to anyone (a new donor has no certificate yet), and
gRPC gives a server no say over the connections it accepts: no per-peer limit, and an
interceptor sees RPCs, never a connection that has not finished its handshake. So the
public enrollment port is this small asyncio server, and gRPC's enrollment listener is
on loopback behind it. For each connection the front:

- refuses it (a reset) when its peer (an IPv4 address, or an IPv6 /64: one host can use
  a whole /64) already holds `per_peer` connections;
- when `total` connections are open, closes the oldest one that has not sent a byte to
  make room, or refuses the new one if every open connection has spoken;
- closes it if it sends nothing within `silent_timeout_s`;
- on its first byte only, connects to gRPC and from then on copies bytes both ways
  (TLS stays end to end: the front never decrypts). gRPC then applies its handshake
  deadline, idle time and age limit to what reaches it.

A silent connection costs one descriptor and a few hundred bytes of Python objects, and
never reaches gRPC's handshake memory. The copying costs a loop callback per read: a
request and its reply take about 0.1 ms longer through the front than straight to gRPC
on loopback (30–320 µs over ten runs on a shared 2-core machine, against about 0.5 ms;
`tests/benchmarks/coordinator_flood.py`, `splice_us`). An enrollment is one such
exchange per donor, so that is nothing here; on the main port it would tax every
report, which is why donors' streams and the admin API go straight to gRPC there (see
`connection_limits.py` for what bounds that port).

What is lost: gRPC sees the front's loopback address as the caller of Enroll; the
front's own log notes who was refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import socket
import struct
import time
from collections import Counter
from dataclasses import dataclass

log = logging.getLogger(__name__)

# How often the front says what it refused (at most; only when it refused something).
NOTE_EVERY_S = 60.0
ACCEPT_BACKLOG = 1024
# Connections accepted per wake-up of the loop: a flood cannot hold the loop for long.
ACCEPT_BATCH = 64
ACCEPT_RETRY_S = 0.1
_OUT_OF_RESOURCES = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


def peer_key(host: str) -> str:
    """Whom a connection counts against: its IPv4 address, or its IPv6 /64."""
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


@dataclass(slots=True)
class FrontCounts:
    """What the front refused or closed since it started (for the log and tests)."""

    over_peer: int = 0  # refused: the peer held its share
    over_total: int = 0  # refused: the front was full of connections that had spoken
    evicted: int = 0  # closed silent to make room for a new one
    silent: int = 0  # closed for sending nothing in time
    out_of_resources: int = 0  # accept() failed for want of descriptors or memory


class _Backend(asyncio.Protocol):
    """The front's connection to gRPC for one client."""

    def __init__(self, splice: _Splice) -> None:
        self._splice = splice

    def data_received(self, data: bytes) -> None:
        self._splice.to_client(data)

    def eof_received(self) -> bool:
        self._splice.close()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._splice.close()

    # gRPC reads slower than the client writes: stop reading the client.
    def pause_writing(self) -> None:
        self._splice.pause_client()

    def resume_writing(self) -> None:
        self._splice.resume_client()


class _Splice(asyncio.Protocol):
    """One admitted client connection, and from its first byte on, its connection to gRPC."""

    def __init__(self, front: TcpFront, peer: str) -> None:
        self._front = front
        self.peer = peer
        self._client: asyncio.Transport | None = None
        self._backend: asyncio.Transport | None = None
        self._early: list[bytes] = []  # read before the connection to gRPC was up
        self._timer: asyncio.TimerHandle | None = None
        self._connecting: asyncio.Task[None] | None = None
        self.silent = True
        self.closed = False

    def start_timer(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = loop.call_later(self._front.silent_timeout_s, self._silent_too_long)

    # --- the client's side -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        if self.closed:  # evicted or timed out before its transport was made
            transport.abort()
            return
        self._client = transport

    def data_received(self, data: bytes) -> None:
        if self._backend is not None:
            self._backend.write(data)
            return
        self._early.append(data)
        if self.silent:
            self.silent = False
            self._front.spoke(self)
            if self._timer is not None:
                self._timer.cancel()
            assert self._client is not None
            # Nothing more is read until gRPC is reached, so the buffer stays one read.
            self._client.pause_reading()
            self._connecting = asyncio.get_running_loop().create_task(self._connect())

    def eof_received(self) -> bool:
        self.close()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.close()

    # The client reads slower than gRPC writes: stop reading gRPC.
    def pause_writing(self) -> None:
        if self._backend is not None:
            self._backend.pause_reading()

    def resume_writing(self) -> None:
        if self._backend is not None:
            self._backend.resume_reading()

    # --- between the two ----------------------------------------------------------------

    async def _connect(self) -> None:
        host, port = self._front.backend
        try:
            transport, _ = await asyncio.get_running_loop().create_connection(
                lambda: _Backend(self), host, port
            )
        except OSError as error:
            log.warning("enrollment front: cannot reach gRPC at %s:%d: %s", host, port, error)
            self.close()
            return
        if self.closed:
            transport.close()
            return
        self._backend = transport
        for chunk in self._early:
            transport.write(chunk)
        self._early.clear()
        self.resume_client()

    def to_client(self, data: bytes) -> None:
        if self._client is not None:
            self._client.write(data)

    def pause_client(self) -> None:
        if self._client is not None:
            self._client.pause_reading()

    def resume_client(self) -> None:
        if self._client is not None and not self.closed:
            self._client.resume_reading()

    def _silent_too_long(self) -> None:
        self._front.counts.silent += 1
        self.close()

    def close(self) -> None:
        """Close both sides (what is already written is still sent); idempotent."""
        if self.closed:
            return
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
        if self._connecting is not None and not self._connecting.done():
            self._connecting.cancel()
        self._early.clear()
        self._front.release(self)
        if self._client is not None:
            self._client.close()
        if self._backend is not None:
            self._backend.close()


def _reset(sock: socket.socket) -> None:
    """Close with a reset at once: the descriptor is free before the next accept."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


class TcpFront:
    """Listens on the public enrollment address; splices admitted clients to `backend`."""

    def __init__(
        self, backend: tuple[str, int], per_peer: int, total: int, silent_timeout_s: float
    ) -> None:
        self.backend = backend
        self.per_peer = per_peer
        self.total = total
        self.silent_timeout_s = silent_timeout_s
        self.counts = FrontCounts()
        self._by_peer: Counter[str] = Counter()
        self._open: set[_Splice] = set()
        self._silent: dict[_Splice, None] = {}  # oldest first
        self._listener: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: set[asyncio.Task[None]] = set()
        self._noted_at = float("-inf")

    @property
    def open_connections(self) -> int:
        return len(self._open)

    async def start(self, host: str, port: int) -> int:
        """Listen on host:port (port 0: a free one); the port it listens on."""
        self._loop = loop = asyncio.get_running_loop()
        family, kind, proto, _, address = (
            await loop.getaddrinfo(
                host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )
        )[0]
        listener = socket.socket(family, kind, proto)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(address)
            listener.listen(ACCEPT_BACKLOG)
            listener.setblocking(False)
        except OSError:
            listener.close()
            raise
        self._listener = listener
        loop.add_reader(listener.fileno(), self._accept)
        return int(listener.getsockname()[1])

    async def close(self) -> None:
        if self._listener is not None and self._loop is not None:
            self._loop.remove_reader(self._listener.fileno())
            self._listener.close()
            self._listener = None
        for splice in list(self._open):
            splice.close()
        for task in list(self._pending):
            task.cancel()
        await asyncio.gather(*self._pending, return_exceptions=True)

    # --- accepting ----------------------------------------------------------------------
    # asyncio's own server would accept a whole backlog before any protocol could refuse
    # a connection, each accepted socket holding a descriptor until a task of its own
    # ran: a flood ran the process out of descriptors. Here each connection is judged
    # the moment it is accepted, and a refused one is closed at once.

    def _accept(self) -> None:
        assert self._listener is not None and self._loop is not None
        for _ in range(ACCEPT_BATCH):
            try:
                sock, address = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as error:
                # The kernel keeps the connection queued; try again shortly rather
                # than spin on a listener that stays readable.
                if error.errno in _OUT_OF_RESOURCES:
                    self.counts.out_of_resources += 1
                    self._note(f"accept: {error.strerror}")
                else:
                    log.warning("enrollment front: accept failed: %s", error)
                listener = self._listener
                self._loop.remove_reader(listener.fileno())
                self._loop.call_later(ACCEPT_RETRY_S, self._resume_accepting, listener)
                return
            splice = self._admit(peer_key(str(address[0])))
            if splice is None:
                _reset(sock)
                continue
            sock.setblocking(False)
            splice.start_timer(self._loop)
            task = self._loop.create_task(self._attach(sock, splice))
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)

    async def _attach(self, sock: socket.socket, splice: _Splice) -> None:
        """Give the accepted socket its transport (asyncio's public way is a coroutine)."""
        try:
            await asyncio.get_running_loop().connect_accepted_socket(lambda: splice, sock)
        except OSError:
            splice.close()
            sock.close()
        except asyncio.CancelledError:
            splice.close()
            sock.close()
            raise

    def _resume_accepting(self, listener: socket.socket) -> None:
        if self._listener is listener and self._loop is not None:
            self._loop.add_reader(listener.fileno(), self._accept)

    def _admit(self, peer: str) -> _Splice | None:
        if self._by_peer[peer] >= self.per_peer:
            self.counts.over_peer += 1
            self._note(peer)
            return None
        if len(self._open) >= self.total:
            if not self._silent:
                self.counts.over_total += 1
                self._note(peer)
                return None
            self.counts.evicted += 1
            next(iter(self._silent)).close()
        splice = _Splice(self, peer)
        self._by_peer[peer] += 1
        self._open.add(splice)
        self._silent[splice] = None
        return splice

    def spoke(self, splice: _Splice) -> None:
        self._silent.pop(splice, None)

    def release(self, splice: _Splice) -> None:
        if splice not in self._open:
            return
        self._open.discard(splice)
        self._silent.pop(splice, None)
        self._by_peer[splice.peer] -= 1
        if self._by_peer[splice.peer] <= 0:
            del self._by_peer[splice.peer]

    def _note(self, last: str) -> None:
        now = time.monotonic()
        if now - self._noted_at < NOTE_EVERY_S:
            return
        counts = self.counts
        log.warning(
            "enrollment port, since start: refused %d connections over the per-peer limit"
            " (%d) and %d with the port full (%d); closed %d silent ones to make room and"
            " %d after %.0f s of silence; out of descriptors %d times (last: %s)",
            counts.over_peer,
            self.per_peer,
            counts.over_total,
            self.total,
            counts.evicted,
            counts.silent,
            self.silent_timeout_s,
            counts.out_of_resources,
            last,
        )
        self._noted_at = now
