"""Host sensor: owner CPU = host − guests, with fakes and with a real CPU-burning child."""

from __future__ import annotations

import math
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace

import psutil
import pytest

from donor_app.activity.host import (
    Battery,
    ProcessCpu,
    PsutilFunctions,
    PsutilHostSensor,
    Temperature,
    busy_cpu_seconds,
    max_temperature,
    on_battery,
)

GIB = 1024**3


@dataclass(frozen=True)
class FakeBattery:
    power_plugged: bool | None


@dataclass(frozen=True)
class FakeTemperature:
    current: float


@dataclass
class FakeHost:
    """Fake psutil state the test moves by hand; `functions()` binds it."""

    now: float = 1_000.0  # monotonic
    wall: float = 1_700_000_000.0  # epoch
    busy: float = 0.0  # host busy CPU-seconds, all cores
    cores: int = 4
    processes: dict[int, ProcessCpu] = field(default_factory=dict)
    battery: Battery | None = None
    temperatures: Mapping[str, Sequence[Temperature]] | None = None

    def advance(self, seconds: float, *, busy: float = 0.0) -> None:
        self.now += seconds
        self.wall += seconds
        self.busy += busy

    def run(self, pid: int, cpu_seconds: float) -> None:
        self.processes[pid] = replace(
            self.processes[pid], cpu_seconds=self.processes[pid].cpu_seconds + cpu_seconds
        )

    def functions(self) -> PsutilFunctions:
        def temperatures() -> Mapping[str, Sequence[Temperature]]:
            assert self.temperatures is not None
            return self.temperatures

        return PsutilFunctions(
            busy_cpu_seconds=lambda: self.busy,
            process_cpu=self.processes.get,
            sensors_battery=lambda: self.battery,
            sensors_temperatures=None if self.temperatures is None else temperatures,
            total_memory_bytes=lambda: 16 * GIB,
            cpu_count=lambda: self.cores,
        )

    def sensor(self, guests: list[int]) -> PsutilHostSensor:
        return PsutilHostSensor(
            lambda: guests,
            functions=self.functions(),
            clock=lambda: self.now,
            wall_clock=lambda: self.wall,
        )


def test_busy_seconds_exclude_idle_wait_steal_and_double_counted_guest_time() -> None:
    times = {
        "user": 50.0,  # includes guest
        "nice": 5.0,  # includes guest_nice
        "system": 20.0,
        "idle": 300.0,
        "iowait": 10.0,
        "irq": 1.0,
        "softirq": 2.0,
        "steal": 7.0,
        "guest": 30.0,
        "guest_nice": 1.0,
    }
    assert busy_cpu_seconds(times) == 50 + 5 + 20 + 1 + 2
    # Windows / macOS field sets have none of the Linux-only fields.
    assert busy_cpu_seconds({"user": 3.0, "system": 1.0, "idle": 9.0, "interrupt": 0.5}) == 4.5


def test_battery_states() -> None:
    assert on_battery(None) is None
    assert on_battery(FakeBattery(None)) is None
    assert on_battery(FakeBattery(True)) is False
    assert on_battery(FakeBattery(False)) is True


def test_max_temperature_skips_non_finite_and_accepts_empty() -> None:
    sensors = {
        "coretemp": [FakeTemperature(51.0), FakeTemperature(63.5)],
        "acpitz": [FakeTemperature(math.nan)],
        "nvme": [FakeTemperature(40.0)],
    }
    assert max_temperature(sensors) == 63.5
    assert max_temperature({}) is None


def test_owner_load_is_host_minus_guests() -> None:
    host = FakeHost(processes={10: ProcessCpu(100.0, started_at=0.0)})
    sensor = host.sensor([10])

    host.advance(2.0, busy=5.0)  # 5 CPU-seconds in 2 s on 4 cores = 62.5 %
    host.run(10, 3.0)  # of which the guest used 3 (37.5 %)
    reading = sensor.read()

    assert reading.owner_cpu_percent == pytest.approx(25.0)
    assert reading.cpu_count == 4
    assert reading.total_memory_mib == 16 * 1024


def test_each_read_covers_the_time_since_the_previous_one() -> None:
    host = FakeHost(cores=2)
    sensor = host.sensor([])
    host.advance(1.0, busy=2.0)
    assert sensor.read().owner_cpu_percent == pytest.approx(100.0)
    host.advance(1.0, busy=0.5)
    assert sensor.read().owner_cpu_percent == pytest.approx(25.0)


def test_result_is_clamped_to_0_100() -> None:
    host = FakeHost(cores=1, processes={10: ProcessCpu(0.0, started_at=0.0)})
    sensor = host.sensor([10])
    host.advance(1.0, busy=0.5)
    host.run(10, 0.6)  # sampling skew: the guest seems to use more than the host
    assert sensor.read().owner_cpu_percent == 0.0
    host.advance(1.0, busy=1.2)
    assert sensor.read().owner_cpu_percent == 100.0


def test_two_reads_in_one_clock_tick_repeat_the_last_figure() -> None:
    host = FakeHost(cores=1)
    sensor = host.sensor([])
    host.advance(1.0, busy=0.4)
    assert sensor.read().owner_cpu_percent == pytest.approx(40.0)
    assert sensor.read().owner_cpu_percent == pytest.approx(40.0)  # elapsed 0


def test_guest_started_during_the_interval_counts_all_its_cpu() -> None:
    host = FakeHost(cores=2)
    guests: list[int] = []
    sensor = host.sensor(guests)

    host.advance(1.0, busy=1.5)
    host.processes[20] = ProcessCpu(1.0, started_at=host.wall - 0.5)  # booted meanwhile
    guests.append(20)

    assert sensor.read().owner_cpu_percent == pytest.approx(25.0)


def test_guest_running_before_it_was_known_is_baselined() -> None:
    host = FakeHost(cores=1, processes={30: ProcessCpu(500.0, started_at=0.0)})
    guests: list[int] = []
    sensor = host.sensor(guests)

    host.advance(1.0, busy=0.6)
    guests.append(30)  # an old process newly declared a guest: no baseline yet
    assert sensor.read().owner_cpu_percent == pytest.approx(60.0)  # safe side: busier

    host.advance(1.0, busy=0.6)
    host.run(30, 0.5)
    assert sensor.read().owner_cpu_percent == pytest.approx(10.0)


def test_reused_pid_is_a_new_process() -> None:
    host = FakeHost(cores=1, processes={40: ProcessCpu(900.0, started_at=0.0)})
    sensor = host.sensor([40])

    host.advance(1.0, busy=0.7)
    # The guest exited and an unrelated process got its PID; it is still "a guest" to
    # the supplier, but its CPU time must not be diffed against the old one's.
    host.processes[40] = ProcessCpu(0.2, started_at=host.wall - 0.1)
    assert sensor.read().owner_cpu_percent == pytest.approx(50.0)


def test_vanished_guest_is_dropped() -> None:
    host = FakeHost(cores=1, processes={50: ProcessCpu(10.0, started_at=0.0)})
    sensor = host.sensor([50])
    host.advance(1.0, busy=0.3)
    del host.processes[50]
    assert sensor.read().owner_cpu_percent == pytest.approx(30.0)


def test_battery_and_temperature_pass_through() -> None:
    host = FakeHost(
        battery=FakeBattery(False),
        temperatures={"k10temp": [FakeTemperature(71.0)]},
    )
    reading = host.sensor([]).read()
    assert reading.on_battery is True
    assert reading.max_temperature_c == 71.0


def test_no_battery_and_no_temperature_function() -> None:
    reading = FakeHost().sensor([]).read()  # psutil on Windows/macOS: no temperatures
    assert reading.on_battery is None
    assert reading.max_temperature_c is None


def test_unreadable_temperatures_are_none() -> None:
    host = FakeHost()
    sensor = PsutilHostSensor(
        lambda: [],
        functions=replace(host.functions(), sensors_temperatures=_raise_oserror),
        clock=lambda: host.now,
        wall_clock=lambda: host.wall,
    )
    assert sensor.read().max_temperature_c is None


def _raise_oserror() -> Mapping[str, Sequence[Temperature]]:
    raise OSError("permission denied")


def test_real_psutil_functions_answer_here() -> None:
    functions = PsutilFunctions.system()
    assert functions.busy_cpu_seconds() > 0
    assert functions.cpu_count() >= 1
    assert functions.total_memory_bytes() > 0
    assert functions.process_cpu(2**22 + 12345) is None  # beyond pid_max: no such process
    me = functions.process_cpu(psutil.Process().pid)
    assert me is not None
    assert me.cpu_seconds > 0
    assert me.started_at <= time.time()


@pytest.fixture
def cpu_burner() -> Iterator[psutil.Process]:
    """A child process spinning one core, standing in for a guest's QEMU."""
    child = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        yield psutil.Process(child.pid)
    finally:
        child.kill()
        child.wait(timeout=10)


def _cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


def test_real_guest_cpu_is_subtracted(cpu_burner: psutil.Process) -> None:
    # Two sensors over the same interval: one knows the burner is a guest, one does not.
    # The difference between their owner loads is the burner's share of the host.
    as_guest = PsutilHostSensor(lambda: [cpu_burner.pid])
    unaware = PsutilHostSensor(lambda: [])
    started, burned_before = time.monotonic(), _cpu_seconds(cpu_burner)

    deadline = started + 30
    while _cpu_seconds(cpu_burner) - burned_before < 0.6:  # wait for work, not a time
        assert time.monotonic() < deadline, "the CPU burner never got CPU time"
        time.sleep(0.05)

    owner_with_guest = as_guest.read().owner_cpu_percent
    owner_without = unaware.read().owner_cpu_percent
    elapsed = time.monotonic() - started
    burner_share = (
        (_cpu_seconds(cpu_burner) - burned_before) / (elapsed * (psutil.cpu_count() or 1)) * 100
    )

    assert owner_with_guest < owner_without
    assert owner_without - owner_with_guest == pytest.approx(
        burner_share, abs=max(8.0, 0.25 * burner_share)
    )
