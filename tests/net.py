"""A free TCP port on loopback, for servers a test must restart where clients expect them.

Servers a test starts once bind port 0 and report the port they got; only a server that
must come back on the same address needs a port chosen beforehand. The OS picks one that
is free now; another process could take it before the server binds it, so callers that
can retry do.
"""

from __future__ import annotations

import socket


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on at the moment of the call."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
