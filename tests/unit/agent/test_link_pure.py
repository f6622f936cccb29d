"""The link's pure parts: backoff and what the donor offers."""

from __future__ import annotations

import random
from datetime import UTC, datetime
from itertools import islice

from donor_app.agent.link.connection import backoff_delays, capacity_now
from donor_app.domain.decision import Cause, Decision, EffectiveCaps, Level
from donor_app.domain.status import AgentStatus


def test_backoff_grows_to_its_cap_with_jitter() -> None:
    delays = list(islice(backoff_delays(1.0, 60.0, random.Random(7)), 12))
    assert all(0.5 <= d <= 60.0 for d in delays)
    assert max(delays[8:]) > 10  # it grew
    assert len(set(delays)) == len(delays)  # jittered, not lockstep


def _status(level: Level, cpu: float) -> AgentStatus:
    decision = Decision(level, Cause.IDLE, EffectiveCaps(cpu, 2048), "r")
    return AgentStatus(at=datetime.now(UTC), decision=decision, guests=())


def test_a_donor_lends_only_while_running_or_throttled() -> None:
    idle = capacity_now(_status(Level.RUN, 100.0), "x86_64")
    assert (idle.lend_cpu_percent, idle.lend_memory_mib, idle.idle) == (100.0, 2048, True)
    busy = capacity_now(_status(Level.THROTTLED, 25.0), "x86_64")
    assert (busy.lend_cpu_percent, busy.idle) == (25.0, False)
    paused = capacity_now(_status(Level.PAUSED, 0.0), "amd64")
    assert (paused.lend_cpu_percent, paused.lend_memory_mib, paused.arch) == (0.0, 0, "x86_64")
    assert capacity_now(None, "aarch64").arch == "aarch64"
