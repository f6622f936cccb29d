"""What the agent shows its clients (the tray, `donor-agent`'s status line): value types.

The agent builds these; `donor_app.proto.serde` carries them over the local API.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from donor_app.domain.decision import Decision
from donor_app.domain.guest import GuestState


@dataclass(frozen=True, slots=True)
class GuestSnapshot:
    """One guest now. `cpu_percent` is of one host core over the last interval;
    `cpu_cap_percent` is of the guest's own vCPUs."""

    name: str
    state: GuestState
    cpu_percent: float
    memory_mib: float
    cpu_cap_percent: float


class LinkState(enum.StrEnum):
    """The state of the agent's link to the fleet's coordinator."""

    NOT_CONFIGURED = "not_configured"
    """No coordinator configured: donating locally only."""
    ENROLLING = "enrolling"
    CONNECTED = "connected"
    DISCONNECTED = "disconnected"
    """Lost or not reached yet; retrying."""
    REFUSED = "refused"
    """Revoked, or a bad token: needs the admin."""


@dataclass(frozen=True, slots=True)
class LinkStatus:
    """The agent's link to the fleet's coordinator."""

    address: str = ""
    state: LinkState = LinkState.NOT_CONFIGURED
    detail: str = ""
    donor_id: str = ""


# How a fleet guest came to this donor or left it (see donor_app/agent/link/journal.py):
# started (booted fresh here), restored (from a checkpoint; peer: the donor it was taken
# on), arrived (live migration to here; peer: the source), left (live-migrated away; peer:
# the target), saved (saved and its checkpoint handed to the coordinator: it stops here),
# removed (stopped here by the coordinator; detail: its reason).
MoveEvent = Literal["started", "restored", "arrived", "left", "saved", "removed"]


@dataclass(frozen=True, slots=True)
class GuestMove:
    """One movement of a fleet guest on this donor. `event` is a `MoveEvent` (a plain
    str: a newer agent may send events this tray does not know); `peer` is the other
    donor's id, "" when none; `at` is timezone-aware."""

    at: datetime
    guest: str
    event: str
    peer: str = ""
    detail: str = ""


@dataclass(frozen=True, slots=True)
class AgentStatus:
    at: datetime
    decision: Decision
    guests: tuple[GuestSnapshot, ...]
    snoozed_until: datetime | None = None
    snoozed_indefinitely: bool = False
    settings_error: str = ""
    user_agent: bool = False
    coordinator: LinkStatus = LinkStatus()
    moves: tuple[GuestMove, ...] = ()  # the latest fleet guest moves, newest first

    def same_except_time(self, other: AgentStatus | None) -> bool:
        """True when nothing a client shows differs (ignoring `at` and fresh figures)."""
        if other is None:
            return False
        return (
            self.decision.same_state(other.decision)
            and [(g.name, g.state, g.cpu_cap_percent) for g in self.guests]
            == [(g.name, g.state, g.cpu_cap_percent) for g in other.guests]
            and (self.snoozed_until, self.snoozed_indefinitely, self.settings_error)
            == (other.snoozed_until, other.snoozed_indefinitely, other.settings_error)
            and self.coordinator == other.coordinator
            and self.moves == other.moves
        )


def status_line(status: AgentStatus) -> str:
    """One line for a terminal: what is lent now, why, and until when."""
    parts = [status.decision.reason]
    for guest in status.guests:
        parts.append(
            f"{guest.name}: {guest.state}, {guest.cpu_percent:.0f} % CPU, "
            f"{guest.memory_mib:.0f} MiB"
        )
    if not status.guests:
        parts.append("no guests")
    if status.decision.next_change is not None:
        parts.append(f"next change {status.decision.next_change.astimezone():%H:%M:%S}")
    if status.settings_error:
        parts.append(f"settings error: {status.settings_error}")
    return " | ".join(parts)
