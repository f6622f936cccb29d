"""How many connections each of the coordinator's ports may hold, and for how long.

Every open connection costs the process a file descriptor, and one that never finishes
its handshake costs it as much as a donor does. Without bounds, idle connections to the
enrollment port used up the descriptors (the health check and the admin port stopped
answering) and gRPC's memory for them (RSS tripled). Here are the bounds:

- the descriptor limit: the soft RLIMIT_NOFILE is raised to the hard one at start
  (`raise_fd_limit`), since a coordinator holds one connection per donor;
- the budget (`budget`) splits that limit: a reserve for the rest of the process (the
  store, image files, metrics, logs, gRPC's own pollers), the enrollment front (three
  descriptors per connection it splices: the client's, its own to gRPC, gRPC's end;
  see `tcp_front.py`) and the main port (one per connection). gRPC enforces the main
  port's share per listener (`grpc.max_allowed_incoming_connections`: a connection over
  it is closed as soon as it is accepted), so a flood there can refuse new connections
  while it lasts but never leaves the process without a descriptor;
- deadlines (`ConnectionLimits`): gRPC closes a connection that has not finished its TLS
  handshake and HTTP/2 preface within `handshake_timeout` (`grpc.server_handshake_
  timeout_ms`; gRPC's own default is two minutes), and one without an RPC for the idle
  time (`grpc.max_connection_idle_ms`). The enrollment port also bounds a connection's
  age (`grpc.max_connection_age_ms`, then a grace for the RPC under way): enrolling or a
  health check takes milliseconds, and a donor's long stream is on the main port.
"""

from __future__ import annotations

import logging
import resource
from dataclasses import dataclass

log = logging.getLogger(__name__)

# A connection the enrollment front splices to gRPC holds three descriptors here.
FDS_PER_SPLICE = 3


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    """The deadlines (seconds) and caps; the defaults are the documented bounds."""

    # From gRPC's accept (behind the enrollment front: from the client's first byte) to
    # the end of the TLS handshake and the HTTP/2 preface.
    handshake_timeout_s: float = 10.0
    # Enrollment port: a connection that sends nothing at all is closed after this.
    silent_timeout_s: float = 5.0
    # A connection with no RPC under way: a donor always has its Connect stream open, an
    # admin client reconnects when it next calls.
    main_idle_s: float = 300.0
    enroll_idle_s: float = 30.0
    enroll_max_age_s: float = 120.0
    enroll_age_grace_s: float = 30.0
    # The most connections the enrollment front holds at once, and from one peer (an
    # IPv4 address or an IPv6 /64). A site behind one NAT address enrolls its machines a
    # few at a time: agents retry with backoff.
    enroll_connections: int = 1024
    enroll_per_peer: int = 32
    # Descriptors kept for everything but client connections.
    reserve_fds: int = 128


@dataclass(frozen=True, slots=True)
class Budget:
    """The descriptor limit in force and the connections each port may hold under it."""

    fd_limit: int
    enroll_connections: int
    enroll_per_peer: int
    main_connections: int


def budget(limits: ConnectionLimits, fd_limit: int) -> Budget:
    """Split `fd_limit` between the reserve, the enrollment front and the main port.

    The enrollment port gets at most an eighth of what is left (it serves a moment of
    each donor's life), the main port the rest; each keeps a few connections even under
    an absurdly low limit, so the coordinator still starts there.
    """
    usable = max(fd_limit - limits.reserve_fds, 32)
    enroll = max(4, min(limits.enroll_connections, usable // 8))
    main = max(4, usable - FDS_PER_SPLICE * enroll)
    return Budget(fd_limit, enroll, max(1, min(limits.enroll_per_peer, enroll)), main)


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def main_port_options(limits: ConnectionLimits, plan: Budget) -> list[tuple[str, int]]:
    """gRPC server options for the main port (donors' streams, the admin API)."""
    return [
        ("grpc.server_handshake_timeout_ms", _ms(limits.handshake_timeout_s)),
        ("grpc.max_connection_idle_ms", _ms(limits.main_idle_s)),
        ("grpc.max_allowed_incoming_connections", plan.main_connections),
    ]


def enroll_port_options(limits: ConnectionLimits, plan: Budget) -> list[tuple[str, int]]:
    """gRPC server options behind the enrollment front (Enroll and the health check)."""
    return [
        ("grpc.server_handshake_timeout_ms", _ms(limits.handshake_timeout_s)),
        ("grpc.max_connection_idle_ms", _ms(limits.enroll_idle_s)),
        ("grpc.max_connection_age_ms", _ms(limits.enroll_max_age_s)),
        ("grpc.max_connection_age_grace_ms", _ms(limits.enroll_age_grace_s)),
        # The front admits no more; this also bounds local processes that reach gRPC's
        # loopback listener without going through the front.
        ("grpc.max_allowed_incoming_connections", plan.enroll_connections),
    ]


def raise_fd_limit() -> int:
    """Raise the soft descriptor limit to the hard one; the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # An unlimited hard limit is still capped by the kernel (fs.nr_open); ask for what
    # a coordinator of this size needs and no more.
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if target <= soft:
        log.info("descriptor limit: %d (the hard limit)", soft)
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError) as error:
        log.warning("descriptor limit stays %d: cannot raise it to %d (%s)", soft, target, error)
        return soft
    log.info("descriptor limit raised from %d to %d (the hard limit)", soft, target)
    return target
