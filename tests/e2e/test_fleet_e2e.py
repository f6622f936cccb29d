"""The whole loop on one machine: a real coordinator, a real donor-agent process with a
real QEMU guest, real input under Xvfb.

The agent enrolls with a one-time token, the admin submits the tiny guest as a workload,
it runs on the donor (its serial counter ticks); then the owner comes back and stays:
the agent asks the coordinator to move the workload, the coordinator (with no other
donor) answers "checkpoint", the donor saves the guest and uploads the checkpoint, and
the workload waits in the queue with it (the donor's own copy is then removed).
"""

from __future__ import annotations

import subprocess
import time
from datetime import timedelta
from pathlib import Path

import pytest

from donor_app.proto.v1 import coordinator_pb2 as pb
from tests.agent_process import running_agent
from tests.coordinator_helpers import running_coordinator
from tests.guest.build_guest import build_guest
from tests.guests import console_ticks
from tests.waiting import wait_for
from tests.xvfb import running_xvfb

pytestmark = [pytest.mark.slow, pytest.mark.qemu]

# Only the owner's input may pause the guests here: the test machine's own load (the
# tests, QEMU under TCG) must not count as the owner's programs being busy.
SETTINGS = """\
idle_after = 3
evacuate_after = 4
checkpoint_after = 600
[owner_load]
pause_above_percent = 100
resume_below_percent = 99
"""


def _workload(admin, workload_id: str) -> pb.Workload:  # type: ignore[no-untyped-def]
    return next(w for w in admin.workloads() if w.id == workload_id)


def test_enroll_run_a_workload_and_answer_the_owners_return(tmp_path: Path) -> None:
    image = build_guest()
    with (
        running_coordinator(
            tmp_path / "coordinator",
            lease_ttl=timedelta(seconds=15),
            report_interval=timedelta(seconds=1),
        ) as coordinator,
        coordinator.admin() as admin,
        running_xvfb() as display,
    ):
        token = admin.create_token(3600, 1).token
        link_args = (
            "--coordinator", coordinator.endpoints.address,
            "--enroll-address", coordinator.endpoints.enroll_address,
            "--coordinator-ca", str(coordinator.endpoints.ca_file),
            "--enroll-token", token,
        )  # fmt: skip
        with running_agent(SETTINGS, display=display, extra_args=link_args) as agent:
            # Enrolled and connected: both sides say so.
            status = wait_for(
                lambda: (s := agent.client.status()).coordinator.state == "connected" and s,
                60,
                "the agent to connect to the coordinator",
            )
            # Its first report may predate the engine's first decision; the next ones
            # offer what the idle machine may lend.
            [donor] = wait_for(
                lambda: [d for d in admin.donors() if d.connected and d.capacity.idle],
                30,
                "the donor listed as idle",
            )
            assert donor.id == status.coordinator.donor_id
            assert donor.capacity.lend_cpu_percent > 0

            submitted = admin.submit(
                pb.WorkloadSpec(
                    name="tiny",
                    vcpus=1,
                    memory_mib=256,
                    kernel=pb.KernelBoot(
                        kernel_sha256=admin.upload_image(image.kernel),
                        initrd_sha256=admin.upload_image(image.initrd),
                        cmdline="console=ttyS0 quiet donor.mode=sleep donor.interval_ms=50",
                    ),
                )
            )
            running = wait_for(
                lambda: (
                    (w := _workload(admin, submitted.id)).state == pb.WORKLOAD_STATE_RUNNING and w
                ),
                120,
                "the workload running on the donor",
            )
            assert (running.donor_id, running.epoch) == (donor.id, 1)
            console = agent.root / "data" / "guests-state" / "guests" / submitted.id / "console.log"
            wait_for(lambda: len(console_ticks(console)) > 5, 60, "the workload's counter")
            assert any(g.name == submitted.id for g in agent.client.status().guests)

            # The owner comes back and keeps typing past evacuate_after.
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                subprocess.run(
                    ["xdotool", "key", "--delay", "0", "shift"],
                    env={"DISPLAY": display},
                    check=True,
                )
                if _workload(admin, submitted.id).state == pb.WORKLOAD_STATE_QUEUED:
                    break
                time.sleep(0.5)
            queued = _workload(admin, submitted.id)
            assert queued.state == pb.WORKLOAD_STATE_QUEUED, agent.log_text()[-3000:]
            assert queued.checkpoint.donor_id == donor.id
            assert queued.checkpoint.epoch == 1

            fleet = coordinator.server.fleet
            assert fleet is not None
            kinds = [(e.kind, e.detail) for e in fleet.store.workload_events(submitted.id)]
            assert ("checkpoint-requested", "owner_active: no donor has room") in kinds
            assert [k for k, _ in kinds][-2:] == ["checkpoint", "requeued"]
            assert fleet.checkpoints.size(queued.checkpoint.sha256) == queued.checkpoint.size
            # The coordinator holds the state now: the donor's saved copy goes (RAM and
            # disk given back).
            wait_for(
                lambda: all(g.name != submitted.id for g in agent.client.status().guests),
                30,
                "the donor's copy removed",
            )
            ticks = console_ticks(console)
            assert ticks == sorted(ticks)
            assert "Traceback" not in agent.log_text()
