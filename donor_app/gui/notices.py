"""Desktop notifications: when to tell the owner, and how often at most.

The owner is told when donating starts or stops for a reason they did not cause (the
schedule, the battery, heat, an administrator's blackout). What they caused themselves
(using the computer, snoozing, switching donating off, their own caps) is never
announced: they know. Pure; the clock is injected.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from donor_app.domain.decision import Cause, Level
from donor_app.domain.status import AgentStatus

NOT_OWNER_CAUSED = frozenset({Cause.SCHEDULE, Cause.BATTERY, Cause.HEAT, Cause.BLACKOUT})

_DONATING = (Level.RUN, Level.THROTTLED)


@dataclass(frozen=True, slots=True)
class Notice:
    title: str
    message: str


def donating(status: AgentStatus) -> bool:
    return status.decision.level in _DONATING


def notice_for(previous: AgentStatus | None, current: AgentStatus) -> Notice | None:
    """A notice if donating started or stopped between two snapshots for a reason the
    owner did not cause, else None. The first snapshot (no `previous`) is not news."""
    if previous is None or donating(previous) == donating(current):
        return None
    if donating(current):
        # Started again: news only if what had stopped it was not the owner's doing.
        if previous.decision.cause in NOT_OWNER_CAUSED:
            return Notice("Donating again", current.decision.reason)
        return None
    if current.decision.cause in NOT_OWNER_CAUSED:
        return Notice("Donating stopped", current.decision.reason)
    return None


class RateLimiter:
    """At most `limit` events per sliding `per`; the rest are refused (dropped).

    A flapping cause (a battery that keeps reconnecting, a temperature near the
    threshold) must not bury the owner in notices; the tooltip still shows the state.
    """

    def __init__(self, limit: int, per: timedelta, clock: Callable[[], datetime]) -> None:
        if limit < 1:
            raise ValueError(f"limit: must be ≥ 1, got {limit}")
        self._limit = limit
        self._per = per
        self._clock = clock
        self._sent: deque[datetime] = deque()

    def allow(self) -> bool:
        """True (and counted) if one more event fits now."""
        now = self._clock()
        while self._sent and now - self._sent[0] >= self._per:
            self._sent.popleft()
        if len(self._sent) >= self._limit:
            return False
        self._sent.append(now)
        return True
