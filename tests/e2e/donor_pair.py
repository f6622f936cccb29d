"""Several real donors on one machine for the migration tests and benchmark.

Each donor is a private libvirtd (tests/libvirtd.py) and a real `donor-agent` process
using it, enrolled with a real coordinator; each tells the coordinator how other donors
reach its libvirt (`--migration-libvirt-uri`) for live migrations. The owner "comes
back" through the agent's local API (ReportActivity, the tray's own path).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import libvirt

from donor_app.coordinator.admin_rpc import AdminRpc as AdminClient
from donor_app.proto.v1 import coordinator_pb2 as pb
from tests.agent_process import AgentProcess, running_agent
from tests.coordinator_helpers import RunningCoordinator
from tests.guest.build_guest import build_guest
from tests.libvirtd import LibvirtDaemon, option, running_libvirtd
from tests.waiting import wait_for

# The owner's activity must not pause the guest outright (the in-use cap lets it run at
# half speed), so a live move is measured on a running guest; the machine's own load (the
# tests, other guests under TCG) must not count as the owner's programs being busy.
SETTINGS = """\
idle_after = 3
evacuate_after = 3
checkpoint_after = 600
[caps.in_use]
cpu_percent = 50
[owner_load]
pause_above_percent = 100
resume_below_percent = 99
"""


@dataclass
class Donor:
    name: str
    daemon: LibvirtDaemon
    agent: AgentProcess
    root: Path
    donor_id: str = ""

    def console(self, workload_id: str) -> Path:
        return self.root / "data" / "guests-state" / "guests" / workload_id / "console.log"

    def qemu_cpu(self, workload_id: str) -> str | None:
        """The `-cpu` of the QEMU running the workload's guest here; None if none runs."""
        return option(self.daemon.qemu_args(f"donor-{workload_id}"), "-cpu")

    def domain_state(self, workload_id: str) -> str | None:
        """'running', 'paused', 'shutoff', … of the workload's domain here; None if none."""
        libvirt.registerErrorHandler(lambda _ctx, _err: None, None)  # "not found" is an answer
        conn = libvirt.open(self.daemon.uri)
        try:
            try:
                dom = conn.lookupByName(f"donor-{workload_id}")
            except libvirt.libvirtError:
                return None
            state = dom.state()[0]
            return {
                libvirt.VIR_DOMAIN_RUNNING: "running",
                libvirt.VIR_DOMAIN_PAUSED: "paused",
                libvirt.VIR_DOMAIN_SHUTOFF: "shutoff",
            }.get(state, str(state))
        finally:
            conn.close()


class OwnerAtDesk:
    """Reports input on a donor twice a second (what the tray forwards) until stopped."""

    def __init__(self, donor: Donor) -> None:
        self._donor = donor
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="owner", daemon=True)

    def __enter__(self) -> OwnerAtDesk:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            try:
                self._donor.agent.client.report_activity(datetime.now(UTC), 3)
            except Exception:
                continue  # the agent may be gone (a test killed it)


def tiny_workload(admin: AdminClient, name: str = "tiny", interval_ms: int = 20) -> pb.Workload:
    image = build_guest()
    return admin.submit(
        pb.WorkloadSpec(
            name=name,
            vcpus=1,
            memory_mib=256,
            kernel=pb.KernelBoot(
                kernel_sha256=admin.upload_image(image.kernel),
                initrd_sha256=admin.upload_image(image.initrd),
                cmdline=f"console=ttyS0 quiet donor.mode=sleep donor.interval_ms={interval_ms}",
            ),
        )
    )


def workload(admin: AdminClient, workload_id: str) -> pb.Workload:
    return next(w for w in admin.workloads() if w.id == workload_id)


def wait_running(
    admin: AdminClient, workload_id: str, timeout: float = 120, not_on: str = ""
) -> pb.Workload:
    return wait_for(
        lambda: (
            (w := workload(admin, workload_id)).state == pb.WORKLOAD_STATE_RUNNING
            and w.donor_id != not_on
            and w
        ),
        timeout,
        f"workload {workload_id} running" + (f" elsewhere than {not_on}" if not_on else ""),
        interval=0.1,
    )


@contextmanager
def running_donor(
    coordinator: RunningCoordinator, admin: AdminClient, name: str, root: Path
) -> Iterator[Donor]:
    """A libvirtd and an agent enrolled with `coordinator` (a fresh token each time; an
    agent started again on the same `root` keeps its enrollment)."""
    with ExitStack() as stack:
        daemon = stack.enter_context(running_libvirtd(root / "lv", name))
        donor = stack.enter_context(start_agent(coordinator, admin, name, root, daemon))
        yield donor


@contextmanager
def start_agent(
    coordinator: RunningCoordinator,
    admin: AdminClient,
    name: str,
    root: Path,
    daemon: LibvirtDaemon,
) -> Iterator[Donor]:
    token = admin.create_token(3600, 1).token
    link_args = (
        "--coordinator", coordinator.endpoints.address,
        "--enroll-address", coordinator.endpoints.enroll_address,
        "--coordinator-ca", str(coordinator.endpoints.ca_file),
        "--enroll-token", token,
        "--migration-libvirt-uri", daemon.uri,
        "--migration-uri", "tcp://127.0.0.1",
    )  # fmt: skip
    with running_agent(
        SETTINGS,
        extra_args=link_args,
        root=root / "agent",
        libvirt_uri=daemon.uri,
        demo=False,
    ) as agent:
        donor = Donor(name, daemon, agent, root / "agent")
        status = wait_for(
            lambda: (s := agent.client.status()).coordinator.state == "connected" and s,
            60,
            f"donor {name} to connect",
            interval=0.1,
        )
        donor.donor_id = status.coordinator.donor_id
        yield donor


def kill_donor(donor: Donor) -> None:
    """The donor machine dies: its agent, its libvirtd and its guests, all at once."""
    donor.agent.process.send_signal(signal.SIGKILL)
    donor.agent.process.wait(10)
    donor.daemon.kill()


def idle_donors(admin: AdminClient, count: int) -> list[pb.Donor]:
    return wait_for(
        lambda: (
            len(d := [d for d in admin.donors() if d.connected and d.capacity.idle]) >= count and d
        ),
        60,
        f"{count} donors listed as idle",
        interval=0.2,
    )
