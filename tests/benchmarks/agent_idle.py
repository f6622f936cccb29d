"""What the agent itself costs while nothing happens: CPU share of one core and RSS.

A real `donor-agent` process with two tiny guests (sleeping, so they do not compete for
the cores): the first half of the window both run (the owner is away), the second half
both are paused (snoozed through the local API), so the agent spends the window with
running and with paused guests. Only the agent process is measured, not QEMU.
Targets: ≤ 0.5 % of one core and ≤ 80 MiB.

    python tests/benchmarks/agent_idle.py [--seconds 60]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.agent_process import running_agent
from tests.waiting import wait_for


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=60.0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    extra = ("--demo-guests", "2", "--demo-mode", "sleep", "--log-level", "WARNING")
    with running_agent("", extra_args=extra) as agent:
        proc = psutil.Process(agent.process.pid)
        wait_for(
            lambda: sum(g.state == "running" for g in agent.client.status().guests) == 2,
            120,
            "both guests to run",
        )
        time.sleep(3)  # let start-up work (image hashing, first scans) settle
        before, start = proc.cpu_times(), time.monotonic()
        rss_peak = proc.memory_info().rss
        half = args.seconds / 2
        snoozed = False
        while (elapsed := time.monotonic() - start) < args.seconds:
            if not snoozed and elapsed >= half:
                agent.client.snooze(None)  # both guests paused for the second half
                snoozed = True
            time.sleep(1.0)  # sampling interval
            rss_peak = max(rss_peak, proc.memory_info().rss)
        after, seconds = proc.cpu_times(), time.monotonic() - start
        states = sorted(g.state for g in agent.client.status().guests)
    used = (after.user - before.user) + (after.system - before.system)
    result = {
        "cpu_percent_of_core": round(100 * used / seconds, 3),
        "rss_mib": round(rss_peak / (1024 * 1024), 1),
        "seconds": round(seconds, 1),
        "guests_at_end": states,
        "cores": os.cpu_count(),
    }
    result["targets_met"] = result["cpu_percent_of_core"] <= 0.5 and result["rss_mib"] <= 80
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
