"""What the tray costs while nothing happens: CPU share of one core and RSS.

A real `donor-agent` with the tiny guest (sleeping, so it does not compete for the
cores) publishes a status every few seconds; `donor-app` runs on Xvfb with a real tray
host (trayer), its icon embedded, its input listener on, following those updates. Only
the tray process is measured, over `--seconds` after it has settled.
Targets: ≤ 0.3 % of one core and ≤ 120 MiB.

    python tests/benchmarks/tray_idle.py [--seconds 60]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from donor_app.agent.local_client import AgentClient, AgentUnavailable
from tests.agent_process import running_agent
from tests.gui.x11 import X11, start_tray_host
from tests.waiting import wait_for
from tests.xvfb import running_xvfb


def _count_updates(client: AgentClient) -> Callable[[], int]:
    """Count the snapshots the agent publishes from now on (what the tray receives)."""
    count = [0]

    def follow() -> None:
        with contextlib.suppress(AgentUnavailable):
            for _ in client.watch():
                count[0] += 1

    threading.Thread(target=follow, daemon=True).start()
    return lambda: count[0]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=60.0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    extra = ("--demo-mode", "sleep", "--log-level", "WARNING")
    with running_xvfb() as display, running_agent("", extra_args=extra) as agent:
        trayer = start_tray_host(display)
        root = Path(tempfile.mkdtemp(prefix="tb-", dir="/tmp"))
        (root / "run").mkdir(mode=0o700)
        env = dict(os.environ)
        env.pop("QT_QPA_PLATFORM", None)
        env.update(
            DISPLAY=display,
            DBUS_SESSION_BUS_ADDRESS="disabled:",
            HOME=str(root),
            XDG_RUNTIME_DIR=str(root / "run"),
        )
        log = root / "tray.log"
        command = [
            sys.executable, "-m", "donor_app.gui", "--socket", str(agent.client.socket_path),
            "--no-start-agent",
        ]  # fmt: skip
        x11 = X11(display)
        with log.open("wb") as output:
            tray = subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT)
        try:
            wait_for(lambda: x11.embedded_icon("donor_app"), 30, "the tray icon")
            wait_for(lambda: "tray state: donating" in log.read_text(), 60, "the tray to connect")
            proc = psutil.Process(tray.pid)
            time.sleep(3)  # let start-up work (imports, first paint) settle
            updates = _count_updates(agent.client)
            before, start = proc.cpu_times(), time.monotonic()
            rss_peak = proc.memory_info().rss
            while time.monotonic() - start < args.seconds:
                time.sleep(1.0)  # sampling interval
                rss_peak = max(rss_peak, proc.memory_info().rss)
            after, seconds = proc.cpu_times(), time.monotonic() - start
            received = updates()
            alive = tray.poll() is None
        finally:
            x11.close()
            tray.terminate()
            tray.wait(timeout=30)
            trayer.terminate()
            trayer.wait(timeout=10)
    used = (after.user - before.user) + (after.system - before.system)
    result = {
        "cpu_percent_of_core": round(100 * used / seconds, 3),
        "rss_mib": round(rss_peak / (1024 * 1024), 1),
        "seconds": round(seconds, 1),
        "cores": os.cpu_count(),
        "status_updates": received,
        "tray_alive": alive,
    }
    result["targets_met"] = result["cpu_percent_of_core"] <= 0.3 and result["rss_mib"] <= 120
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
