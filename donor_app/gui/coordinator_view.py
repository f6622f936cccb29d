"""The agent's coordinator link as the tray shows it.

The one place that reads `AgentStatus.coordinator`: the field is being added to the
domain status alongside the proto's `CoordinatorLink`, so it is read defensively here
(absent attribute, None, or an empty address all mean "no coordinator configured").
Once every agent status carries it, this is the only function to simplify.
"""

from __future__ import annotations

from dataclasses import dataclass

from donor_app.agent.status import AgentStatus


@dataclass(frozen=True, slots=True)
class CoordinatorView:
    """`state`: not_configured, enrolling, connected, disconnected or refused."""

    address: str
    state: str
    detail: str = ""
    donor_id: str = ""


def coordinator_of(status: AgentStatus) -> CoordinatorView | None:
    """The coordinator link of `status`, None when no coordinator is configured."""
    link = getattr(status, "coordinator", None)
    address = str(getattr(link, "address", "") or "")
    if link is None or not address:
        return None
    return CoordinatorView(
        address=address,
        state=str(getattr(link, "state", "") or "unknown"),
        detail=str(getattr(link, "detail", "") or ""),
        donor_id=str(getattr(link, "donor_id", "") or ""),
    )
