"""One contract for the hypervisor layer, run on a real QEMU guest and on libvirt's test:///.

What only a real QEMU process can show (console output, CPU time, the balloon, a start
that fails inside QEMU) is checked where `backend.real_qemu` is true.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from donor_app.domain.guest import GuestState
from donor_app.domain.vm import KernelBoot, VmSpec
from donor_app.hypervisor.errors import HypervisorError, ImageError
from donor_app.hypervisor.events import LifecycleEvent
from tests.guests import console_ticks, tiny_guest_spec
from tests.integration.conftest import Backend
from tests.waiting import wait_for

pytestmark = [pytest.mark.qemu, pytest.mark.slow]
_names = itertools.count()


def _guests_of(backend: Backend) -> Iterator[Callable[..., str]]:
    """Create running guests; every one is removed when the test ends."""
    created: list[str] = []

    def make(mode: str = "sleep", memory_mib: int = 256) -> str:
        name = f"c{next(_names)}"
        backend.hv.create(tiny_guest_spec(name, backend.images, mode, memory_mib))
        created.append(name)
        return name

    yield make
    for name in created:
        if backend.hv.exists(name):
            backend.hv.undefine(name)


@pytest.fixture
def make_guest(backend: Backend) -> Iterator[Callable[..., str]]:
    yield from _guests_of(backend)


@pytest.fixture
def make_qemu_guest(qemu_backend: Backend) -> Iterator[Callable[..., str]]:
    """For what only a real QEMU process shows (CPU time, failures inside QEMU)."""
    yield from _guests_of(qemu_backend)


def _wait_ticking(backend: Backend, guest: str, beyond: int = 0) -> int:
    """Wait until the guest's counter passes `beyond`; return the newest value."""
    if not backend.real_qemu:
        return 0
    console = backend.hv.console_path(guest)
    ticks = wait_for(
        lambda: [t for t in console_ticks(console) if t > beyond],
        timeout=60,
        what=f"guest {guest} to print ticks beyond {beyond}",
    )
    return ticks[-1]


def _events_for(backend: Backend, guest: str, kind: str) -> Callable[[], LifecycleEvent | None]:
    queue = backend.hv.subscribe_events().queue
    seen: list[LifecycleEvent] = []

    def find() -> LifecycleEvent | None:
        while not queue.empty():
            seen.append(queue.get_nowait())
        return next((e for e in seen if e.guest == guest and e.kind == kind), None)

    return find


def test_create_runs_a_guest_that_is_listed(backend: Backend, make_guest: Callable[..., str]):
    guest = make_guest()
    assert backend.hv.state(guest) is GuestState.RUNNING
    assert guest in backend.hv.list_guests()
    assert backend.hv.exists(guest)
    _wait_ticking(backend, guest)


def test_suspend_and_resume_are_idempotent(backend: Backend, make_guest: Callable[..., str]):
    guest = make_guest()
    tick = _wait_ticking(backend, guest)
    backend.hv.suspend(guest)
    backend.hv.suspend(guest)
    assert backend.hv.state(guest) is GuestState.PAUSED
    backend.hv.resume(guest)
    backend.hv.resume(guest)
    assert backend.hv.state(guest) is GuestState.RUNNING
    _wait_ticking(backend, guest, beyond=tick)


def test_lifecycle_events_reach_the_queue(backend: Backend, make_guest: Callable[..., str]):
    started = _events_for(backend, "", "started")  # subscribe before the guest exists
    del started
    guest = make_guest()
    wait_for(_events_for(backend, guest, "started"), 10, f"a started event for {guest}")
    backend.hv.suspend(guest)
    wait_for(_events_for(backend, guest, "suspended"), 10, f"a suspended event for {guest}")


def test_cpu_cap_zero_pauses_and_raising_it_resumes(
    backend: Backend, make_guest: Callable[..., str]
):
    guest = make_guest()
    backend.hv.set_cpu_cap(guest, 50)
    assert backend.hv.cpu_cap(guest) == 50
    assert backend.hv.state(guest) is GuestState.RUNNING
    backend.hv.set_cpu_cap(guest, 0)
    assert backend.hv.state(guest) is GuestState.PAUSED
    backend.hv.set_cpu_cap(guest, 30)
    assert backend.hv.state(guest) is GuestState.RUNNING
    backend.hv.set_cpu_cap(guest, 100)
    assert backend.hv.cpu_cap(guest) == 100
    assert backend.hv.state(guest) is GuestState.RUNNING


@pytest.mark.parametrize("bad", [-1, 100.5, 1000, math.nan, math.inf, True, "50"])
def test_cpu_cap_outside_0_to_100_is_refused(
    backend: Backend, make_guest: Callable[..., str], bad: object
):
    guest = make_guest()
    backend.hv.set_cpu_cap(guest, 40)
    with pytest.raises(ValueError, match=r"cpu_percent: .* 0–100"):
        backend.hv.set_cpu_cap(guest, bad)  # type: ignore[arg-type]
    assert backend.hv.cpu_cap(guest) == 40  # the last good cap stays


def test_cpu_cap_is_applied_to_a_burning_guest(
    qemu_backend: Backend, make_qemu_guest: Callable[..., str]
):
    # What the cap does, not how closely a loaded machine lets it show (that is measured
    # by tests/benchmarks/hypervisor_ops.py and duty_cycle.py): as root, on the embedded
    # driver, cputune's vCPU quota is set live; where the driver has no cputune
    # (qemu:///session) the duty cycle really suspends the guest. Either way the guest
    # then uses at most about its cap: other load on the machine can only lower that.
    # libvirt is asked directly, on a connection of the test's own: `Hypervisor.state`
    # counts a duty-cycled guest as running.
    import os
    import time

    import libvirt

    backend = qemu_backend
    guest = make_qemu_guest(mode="burn")
    _wait_ticking(backend, guest)
    cputune = os.geteuid() == 0

    def share_over(seconds: float) -> float:
        before, start = backend.hv.usage(guest).cpu_seconds, time.monotonic()
        time.sleep(seconds)  # a measurement window, not a wait for a condition
        return (backend.hv.usage(guest).cpu_seconds - before) / (time.monotonic() - start)

    conn = libvirt.open(backend.hv.uri)
    try:
        dom = conn.lookupByName(backend.hv.domain_name(guest))

        def vcpu_quota() -> int:
            params = dom.schedulerParametersFlags(libvirt.VIR_DOMAIN_AFFECT_LIVE)
            assert params["vcpu_period"] == 100_000
            return int(params["vcpu_quota"])

        backend.hv.set_cpu_cap(guest, 20)
        if cputune:
            assert vcpu_quota() == 20_000, "the cap is not the live vCPU quota"
        else:
            wait_for(
                lambda: dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED,
                10,
                "the duty cycle to suspend the guest",
                interval=0.005,
            )
        # 20 %, and the first ~200 ms before the quota bites, stay well under 35 %.
        capped = share_over(2.0)
        assert capped < 0.35, f"capped at 20 % but used {capped:.0%}"

        backend.hv.set_cpu_cap(guest, 100)
        if cputune:
            assert vcpu_quota() == -1, "the quota stayed after the cap was lifted"
        assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
    finally:
        conn.close()


def test_usage_reports_cpu_and_memory(backend: Backend, make_guest: Callable[..., str]):
    guest = make_guest(mode="burn")
    _wait_ticking(backend, guest)
    first = backend.hv.usage(guest)
    assert first.memory_mib == pytest.approx(256, abs=1)
    wait_for(
        lambda: backend.hv.usage(guest).cpu_seconds > first.cpu_seconds,
        10,
        "the guest's CPU time to grow",
    )
    if backend.real_qemu:
        assert first.pid is not None and first.pid in backend.hv.guest_pids()
        assert first.rss_mib is not None and first.rss_mib > 10


def test_memory_cap_inflates_the_balloon(backend: Backend, make_guest: Callable[..., str]):
    guest = make_guest(memory_mib=512)
    _wait_ticking(backend, guest)
    backend.hv.set_memory_cap(guest, 256)
    wait_for(
        lambda: backend.hv.usage(guest).memory_mib <= 260,
        30,
        "the balloon to reach 256 MiB",
        interval=0.1,
    )


@pytest.mark.parametrize("bad", [0, 32, 10_000, -5, True])
def test_memory_cap_outside_the_guest_is_refused(
    backend: Backend, make_guest: Callable[..., str], bad: object
):
    guest = make_guest()
    with pytest.raises(ValueError, match=r"memory_mib: .* 64–256 MiB"):
        backend.hv.set_memory_cap(guest, bad)  # type: ignore[arg-type]


def test_save_and_restore_keep_the_guest_state(
    backend: Backend, make_guest: Callable[..., str], tmp_path: Path
):
    guest = make_guest()
    tick = _wait_ticking(backend, guest, beyond=3)
    image = backend.workdir / "saves" / f"{guest}.save"
    backend.hv.save(guest, image)
    assert backend.hv.state(guest) is GuestState.SHUTOFF
    saved_ticks = console_ticks(backend.hv.console_path(guest))
    backend.hv.restore(guest, image)
    assert backend.hv.state(guest) is GuestState.RUNNING
    if backend.real_qemu:
        last_before = saved_ticks[-1]
        assert last_before >= tick
        _wait_ticking(backend, guest, beyond=last_before + 2)
        after = console_ticks(backend.hv.console_path(guest))
        # The counter continued where it stopped: no reboot (it would restart at 1).
        assert after[len(saved_ticks)] == last_before + 1


def test_restore_refuses_another_guests_state(backend: Backend, make_guest: Callable[..., str]):
    first, second = make_guest(), make_guest()
    image = backend.workdir / "saves" / f"{first}.save"
    backend.hv.save(first, image)
    with pytest.raises(HypervisorError, match="another guest's state"):
        backend.hv.restore(second, image)
    assert backend.hv.state(second) is GuestState.RUNNING


def test_managed_save_is_restored_by_start(backend: Backend, make_guest: Callable[..., str]):
    guest = make_guest()
    tick = _wait_ticking(backend, guest, beyond=3)
    backend.hv.managed_save(guest)
    assert backend.hv.state(guest) is GuestState.SHUTOFF
    assert backend.hv.has_managed_save(guest)
    backend.hv.start(guest)
    assert backend.hv.state(guest) is GuestState.RUNNING
    assert not backend.hv.has_managed_save(guest)
    if backend.real_qemu:
        ticks = console_ticks(backend.hv.console_path(guest))
        assert 1 not in ticks[ticks.index(tick) :], "the guest rebooted instead of resuming"
        _wait_ticking(backend, guest, beyond=tick + 2)


def test_stop_destroy_and_undefine(backend: Backend, make_guest: Callable[..., str]):
    guest = make_guest()
    backend.hv.stop(guest, timeout_s=1)
    assert backend.hv.state(guest) is GuestState.SHUTOFF
    backend.hv.start(guest)
    backend.hv.destroy(guest)
    assert backend.hv.state(guest) is GuestState.SHUTOFF
    backend.hv.undefine(guest)
    assert not backend.hv.exists(guest)
    assert not backend.hv.guest_dir(guest).exists()


@pytest.mark.parametrize(
    "operation",
    ["start", "stop", "destroy", "undefine", "suspend", "resume", "state", "usage", "managed_save"],
)
def test_a_guest_that_is_gone_is_named_in_the_error(backend: Backend, operation: str):
    with pytest.raises(HypervisorError) as caught:
        getattr(backend.hv, operation)("gone-guest")
    assert caught.value.not_found
    assert f"{operation} guest 'gone-guest'" in str(caught.value)


def test_defining_a_name_twice_keeps_the_first(backend: Backend, make_guest: Callable[..., str]):
    guest = make_guest()
    with pytest.raises(HypervisorError, match="already exists"):
        backend.hv.define(tiny_guest_spec(guest, backend.images, memory_mib=512))
    assert backend.hv.state(guest) is GuestState.RUNNING
    assert backend.hv.usage(guest).memory_mib == pytest.approx(256, abs=1)


def test_a_missing_image_leaves_nothing_defined(backend: Backend):
    before = backend.hv.list_guests()
    spec = VmSpec("no-image", 1, 256, KernelBoot("0" * 64))
    with pytest.raises(ImageError, match="not in the image cache") as caught:
        backend.hv.create(spec)
    assert caught.value.guest == "no-image"
    assert backend.hv.list_guests() == before
    assert not backend.hv.guest_dir("no-image").exists()


def test_a_tampered_image_is_refused_and_removed(backend: Backend, tmp_path: Path):
    fake_kernel = tmp_path / "kernel"
    fake_kernel.write_bytes(b"not really a kernel")
    sha = backend.hv.images.add_file(fake_kernel)
    cached = backend.hv.images.path(sha)
    cached.chmod(0o644)
    cached.write_bytes(b"tampered")
    before = backend.hv.list_guests()
    with pytest.raises(ImageError, match="tampered"):
        backend.hv.create(VmSpec("tampered", 1, 256, KernelBoot(sha)))
    assert not cached.exists()
    assert backend.hv.list_guests() == before


def test_a_guest_that_fails_to_start_is_not_left_defined(qemu_backend: Backend):
    backend = qemu_backend  # test:/// starts anything; only QEMU can fail to start
    spec = tiny_guest_spec("fails-to-start", backend.images)
    # A directory where the serial console file should go: QEMU cannot open it.
    backend.hv.console_path(spec.name).mkdir(parents=True)
    with pytest.raises(HypervisorError, match="start guest 'fails-to-start'"):
        backend.hv.create(spec)
    assert not backend.hv.exists(spec.name)
    assert not backend.hv.guest_dir(spec.name).exists()


def test_a_disk_guest_writes_only_to_its_private_overlay(backend: Backend, tmp_path: Path):
    import subprocess

    from donor_app.domain.vm import DiskBoot

    base = tmp_path / "base.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "64M"], check=True)
    sha = backend.hv.images.add_file(base)
    cached = backend.hv.images.path(sha)
    spec = VmSpec("disk-guest", 1, 256, DiskBoot(sha))
    backend.hv.create(spec)
    try:
        assert backend.hv.state("disk-guest") is GuestState.RUNNING
        overlay = backend.hv.guest_dir("disk-guest") / "disk.qcow2"
        info = subprocess.run(
            ["qemu-img", "info", "-U", str(overlay)], capture_output=True, text=True, check=True
        ).stdout
        assert f"backing file: {cached}" in info
        # The guest's disk writes are private (libvirt lends the file to QEMU's user).
        assert overlay.stat().st_mode & 0o777 == 0o600
    finally:
        backend.hv.undefine("disk-guest")
    assert backend.hv.images.path(sha) == cached  # the shared base is untouched (hash holds)
    assert not overlay.exists()


def test_guests_start_while_a_grpc_server_runs_in_the_same_process(
    make_qemu_guest: Callable[..., str], qemu_backend: Backend
):
    # The agent serves gRPC and runs libvirt's embedded driver in one process; gRPC's
    # fork handlers used to abort libvirt's forked children (see donor_app/__init__.py).
    from concurrent.futures import ThreadPoolExecutor

    import grpc

    server = grpc.server(ThreadPoolExecutor(max_workers=1))
    server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        guest = make_qemu_guest()
        assert qemu_backend.hv.state(guest) is GuestState.RUNNING
    finally:
        server.stop(None)


def test_a_guest_printing_without_end_has_its_console_trimmed(qemu_backend: Backend):
    # Here an embedded QEMU driver writes the console file itself (no virtlogd to roll it
    # over): the agent keeps it under its cap, give or take what the guest prints between
    # two looks (its serial port writes about 400 KB/s under TCG).
    import time

    from donor_app.hypervisor.consoles import MAX_BYTES

    backend = qemu_backend
    kernel, initrd = backend.images
    cmdline = "console=ttyS0 quiet rdinit=/bin/busybox -- yes " + "0123456789abcdef" * 4
    spec = VmSpec("spews", 1, 256, KernelBoot(kernel, initrd, cmdline))
    console = backend.hv.console_path(spec.name)
    backup = console.with_name(console.name + ".0")
    backend.hv.create(spec)
    try:
        largest = 0
        deadline = time.monotonic() + 120
        trimmed_at = None
        # Until a second after the first trim (it printed past the cap; it goes on).
        while trimmed_at is None or time.monotonic() < trimmed_at + 1:
            assert time.monotonic() < deadline, f"{console} was never trimmed"
            largest = max(largest, _size(console))
            assert largest < 2 * MAX_BYTES, f"the console reached {largest} bytes"
            if trimmed_at is None and backup.exists():
                trimmed_at = time.monotonic()
            time.sleep(0.005)
        assert MAX_BYTES < _size(backup) < 2 * MAX_BYTES
        names = {p.name for p in console.parent.glob("console.log*")}
        assert names - {"console.log.0.part"} == {"console.log", "console.log.0"}
    finally:
        backend.hv.undefine(spec.name)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0
