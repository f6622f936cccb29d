"""One donor's open Connect stream, seen from the fleet logic: an outbox of commands.

No gRPC here: the servicer drains `outbox` into the stream and, when the session is
closed with a refusal, ends the RPC with that refusal's status.
"""

from __future__ import annotations

import asyncio
import enum
from dataclasses import dataclass, field
from datetime import datetime

from donor_app.domain import link
from donor_app.domain.decision import Level


class Code(enum.Enum):
    """Why a request is refused; the servicers map these to gRPC status codes."""

    INVALID_ARGUMENT = "invalid_argument"
    UNAUTHENTICATED = "unauthenticated"
    PERMISSION_DENIED = "permission_denied"
    NOT_FOUND = "not_found"
    ALREADY_EXISTS = "already_exists"
    FAILED_PRECONDITION = "failed_precondition"
    ABORTED = "aborted"
    RESOURCE_EXHAUSTED = "resource_exhausted"


class Refused(Exception):
    """A caller's request is refused; nothing in the store changed. `str()` is the reason
    shown to the caller."""

    def __init__(self, code: Code, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


# A donor that stops reading its stream must not make the coordinator buffer commands
# forever: past this many unsent commands the session is closed (RESOURCE_EXHAUSTED).
OUTBOX_LIMIT = 1024


@dataclass(eq=False)
class DonorSession:
    donor_id: str
    hostname: str
    opened_at: datetime
    capacity: link.Capacity | None = None
    last_report_at: datetime | None = None
    hello_seen: bool = False
    level: Level | None = None  # the policy rung of its latest report
    outbox: asyncio.Queue[link.Command | None] = field(default_factory=asyncio.Queue)
    refusal: Refused | None = None
    ended: bool = False
    # Commands sent and not yet answered (seq → command), for CommandResults.
    pending: dict[int, link.CoordinatorMessage] = field(default_factory=dict)
    # Workloads already being fenced, so a report repeated every 5 s fences once.
    fencing: set[str] = field(default_factory=set)
    # (workload, epoch) copies already told to go away (not held here, reported stopped).
    cleaned: set[tuple[str, int]] = field(default_factory=set)
    _seq: int = 0

    @property
    def closed(self) -> bool:
        return self.ended

    def send(self, message: link.CoordinatorMessage, now: datetime | None = None) -> int:
        """Queue a command; returns its seq. Acks are not remembered as pending."""
        if self.closed:
            return 0
        if self.outbox.qsize() >= OUTBOX_LIMIT:
            self.close(Refused(Code.RESOURCE_EXHAUSTED, "the donor is not reading its stream"))
            return 0
        self._seq += 1
        if not isinstance(message, link.Ack):
            self.pending[self._seq] = message
        self.outbox.put_nowait(link.Command(seq=self._seq, message=message, sent_at=now))
        return self._seq

    def close(self, refusal: Refused) -> None:
        """End the session: the servicer stops the stream with `refusal`'s status."""
        if not self.ended:
            self.refusal = refusal
            self.finish()

    def finish(self) -> None:
        """End the session normally (the donor closed its side)."""
        if not self.ended:
            self.ended = True
            self.outbox.put_nowait(None)
