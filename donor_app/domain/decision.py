"""What the policy decided: a level on the escalation ladder, caps, and why."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import Enum, StrEnum


class Level(StrEnum):
    """The rungs of the escalation ladder (docs/design.md, "The escalation ladder"),
    mildest first. The values are the words a donor's report carries to the coordinator
    (never compare levels with `<`: that compares the words)."""

    RUN = "run"
    """Donate at the idle caps."""
    THROTTLED = "throttled"
    """Donate at the (non-zero) in-use caps: the owner is active."""
    PAUSED = "paused"
    """Guests suspended; they keep their RAM."""
    EVACUATE = "evacuate"
    """Move the guests to another donor (they stay paused here until moved)."""
    CHECKPOINT = "checkpoint"
    """Save the guests to disk and free their RAM."""


class Cause(Enum):
    """Why the level is what it is, for the tray's icon. One per decision, the
    strongest reason (e.g. DISABLED beats OWNER_ACTIVE)."""

    IDLE = "idle"
    OWNER_ACTIVE = "owner_active"
    OWNER_LOAD = "owner_load"
    BATTERY = "battery"
    HEAT = "heat"
    SNOOZED = "snoozed"
    SCHEDULE = "schedule"
    BLACKOUT = "blackout"
    DISABLED = "disabled"
    ZERO_CAP = "zero_cap"
    """The caps in force allow no CPU or no memory."""


@dataclass(frozen=True, slots=True)
class EffectiveCaps:
    """What the guests may use now: a share of the whole host's CPU (0–100 %) and MiB of
    RAM (resolved against the host's total RAM). A paused guest keeps its RAM up to
    `memory_mib`; 0 MiB means the guests must free their RAM."""

    cpu_percent: float
    memory_mib: int


@dataclass(frozen=True, slots=True)
class Decision:
    """The policy's answer for one moment.

    `reason` is for the owner ("Paused — on battery"); it may change with the readings
    (a temperature), so compare `level` and `caps` to know whether to act. `next_change`
    is when the decision will next change if no reading changes (a window ends, a snooze
    ends, idle_after elapses, …), None if never; the engine may sleep until then.
    """

    level: Level
    cause: Cause
    caps: EffectiveCaps
    reason: str
    next_change: datetime | None = None

    def same_state(self, other: Decision) -> bool:
        """True if both say the same thing (everything but `next_change`)."""
        return (self.level, self.cause, self.caps, self.reason) == (
            other.level,
            other.cause,
            other.caps,
            other.reason,
        )
