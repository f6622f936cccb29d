"""What the agent's local API server and its clients agree on besides agent.proto: how
large a message may be. Its own module so that a client (the tray) loads none of the
server."""

from __future__ import annotations

MAX_MESSAGE_BYTES = 256 * 1024

CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]
"""gRPC options for both ends of the local socket."""
