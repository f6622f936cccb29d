"""The agent's coordinator link as the tray shows it (None: no coordinator configured)."""

from __future__ import annotations

from donor_app.domain.status import AgentStatus, LinkStatus

# The tray's name for the link; the agent's status type carries it as is.
CoordinatorView = LinkStatus


def coordinator_of(status: AgentStatus) -> CoordinatorView | None:
    """The coordinator link of `status`, None when no coordinator is configured."""
    link = status.coordinator
    return link if link.address else None
