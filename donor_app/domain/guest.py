"""A guest at run time: its state, its size as defined, and what it uses now.

One vocabulary for the hypervisor (which reads libvirt's state into it), the agent's
engine and link, the coordinator and the tray. The wire forms live in `donor_app.proto`:
the coordinator link carries a protobuf enum, the agent's local API a word.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class GuestState(enum.StrEnum):
    """Where a guest is in its life.

    The hypervisor reports RUNNING, PAUSED, STOPPED, FAILED or OTHER for a guest it has;
    the agent adds STARTING (being set up, not yet running) and CHECKPOINTED (its state
    saved to disk, nothing running) when it tells the coordinator about its guests.
    """

    STARTING = "starting"
    RUNNING = "running"
    PAUSED = "paused"
    CHECKPOINTED = "checkpointed"
    STOPPED = "stopped"
    """Powered off (libvirt: shut off), or not (yet) here at all."""
    FAILED = "failed"
    """Crashed, or could not be started."""
    OTHER = "other"
    """A state the hypervisor cannot tell (libvirt: no state); the coordinator is told
    FAILED."""

    # libvirt's names for the same states (the hypervisor speaks libvirt's language).
    SHUTOFF = "stopped"
    CRASHED = "failed"


@dataclass(frozen=True, slots=True)
class GuestUsage:
    """What a guest uses now. `pid`/`rss_mib` are None where no QEMU process exists."""

    cpu_seconds: float
    memory_mib: float
    rss_mib: float | None
    pid: int | None


@dataclass(frozen=True, slots=True)
class GuestInfo:
    """A guest's size as defined: what caps are divided by."""

    vcpus: int
    max_memory_mib: int
