"""The host's own state for the policy: the owner's CPU load (host minus guests),
battery, temperature, memory and cores, measured with psutil.

Owner CPU = (host busy CPU-seconds − the guests' QEMU CPU-seconds) over the elapsed
time × cores, both as deltas between two reads. psutil's own `cpu_percent()` is not
used: it keeps its previous sample in module-global state that any other caller in the
process would disturb.

psutil is reached only through `PsutilFunctions` so that the arithmetic is tested with
fakes; `PsutilFunctions.system()` binds the real one.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from donor_app.domain.readings import HostReading

logger = logging.getLogger(__name__)

_MIB = 1024 * 1024

# cpu_times() fields that are not the owner's work: idle and waiting, time stolen by a
# hypervisor below us, and Linux's guest/guest_nice (already included in user/nice).
_NOT_BUSY_FIELDS = ("idle", "iowait", "steal", "guest", "guest_nice")

NEW_GUEST_SLACK_S = 1.0
"""A guest first seen now whose process started up to this long before the previous
read counts all its CPU time as this interval's: psutil's start times are only good to
about a second (Linux boot time is whole seconds), and a freshly booted guest must not
show up as owner load."""


@dataclass(frozen=True, slots=True)
class ProcessCpu:
    """One process's CPU time (user + system, all threads) and start (epoch seconds)."""

    cpu_seconds: float
    started_at: float


class Battery(Protocol):
    """What is read of `psutil.sensors_battery()`."""

    @property
    def power_plugged(self) -> bool | None:
        """True on mains, False on battery, None when unknown."""
        ...


class Temperature(Protocol):
    """What is read of one `psutil.sensors_temperatures()` entry."""

    @property
    def current(self) -> float:
        """Degrees Celsius."""
        ...


@dataclass(frozen=True, slots=True)
class PsutilFunctions:
    """The psutil calls the host sensor makes, injectable for tests.

    `process_cpu` returns None for a process that is gone or not readable.
    `sensors_temperatures` is None where psutil has no such function (Windows, macOS).
    """

    busy_cpu_seconds: Callable[[], float]
    process_cpu: Callable[[int], ProcessCpu | None]
    sensors_battery: Callable[[], Battery | None]
    sensors_temperatures: Callable[[], Mapping[str, Sequence[Temperature]]] | None
    total_memory_bytes: Callable[[], int]
    cpu_count: Callable[[], int]

    @classmethod
    def system(cls) -> PsutilFunctions:
        """Bind the real psutil (imported here: the factory falls back if it cannot)."""
        import psutil  # noqa: PLC0415

        def process_cpu(pid: int) -> ProcessCpu | None:
            try:
                process = psutil.Process(pid)
                with process.oneshot():
                    times = process.cpu_times()
                    started_at = process.create_time()
            except (psutil.NoSuchProcess, psutil.AccessDenied):  # ZombieProcess included
                return None
            return ProcessCpu(times.user + times.system, started_at)

        def busy() -> float:
            return busy_cpu_seconds(psutil.cpu_times()._asdict())

        return cls(
            busy_cpu_seconds=busy,
            process_cpu=process_cpu,
            sensors_battery=psutil.sensors_battery,
            # Absent from psutil on Windows and macOS.
            sensors_temperatures=getattr(psutil, "sensors_temperatures", None),
            total_memory_bytes=lambda: psutil.virtual_memory().total,
            cpu_count=lambda: psutil.cpu_count(logical=True) or 1,
        )


def busy_cpu_seconds(times: Mapping[str, float]) -> float:
    """Busy CPU-seconds, summed over cores, from a `psutil.cpu_times()` mapping."""
    return sum(times.values()) - sum(times.get(field, 0.0) for field in _NOT_BUSY_FIELDS)


def on_battery(battery: Battery | None) -> bool | None:
    """True when running on battery; None without a battery or when unknown."""
    if battery is None or battery.power_plugged is None:
        return None
    return not battery.power_plugged


def max_temperature(sensors: Mapping[str, Sequence[Temperature]]) -> float | None:
    """The hottest finite reading of all sensors, None when there is none."""
    readings = [
        entry.current
        for entries in sensors.values()
        for entry in entries
        if math.isfinite(entry.current)
    ]
    return max(readings, default=None)


class PsutilHostSensor:
    """Host sensor on psutil (see `ports.HostSensor`).

    `guest_pids` returns the PIDs of the guests' QEMU processes at the time of the call
    (called once per read, on the reading thread). `clock` is a monotonic clock for the
    elapsed time, `wall_clock` the epoch clock psutil's process start times use.

    The first read covers the time since construction. A guest that exits between two
    reads takes the CPU it used in that interval with it, so the owner looks busier for
    one read: the safe direction.
    """

    def __init__(
        self,
        guest_pids: Callable[[], Iterable[int]],
        *,
        functions: PsutilFunctions | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._guest_pids = guest_pids
        self._fn = functions if functions is not None else PsutilFunctions.system()
        self._clock = clock
        self._wall_clock = wall_clock
        self._previous_at = clock()
        self._previous_wall = wall_clock()
        self._previous_busy = self._fn.busy_cpu_seconds()
        self._previous_owner_percent = 0.0
        self._guests: dict[int, ProcessCpu] = {}
        self._guest_cpu_seconds_since(self._previous_wall)  # baseline for known guests

    def read(self) -> HostReading:
        """Measure now; CPU is the average since the previous read."""
        now = self._clock()
        wall = self._wall_clock()
        busy = self._fn.busy_cpu_seconds()
        guests = self._guest_cpu_seconds_since(self._previous_wall)
        cpu_count = max(1, self._fn.cpu_count())
        elapsed = now - self._previous_at
        if elapsed > 0:
            owner = (busy - self._previous_busy - guests) / (elapsed * cpu_count) * 100.0
            # Clamped: tick granularity (10 ms) and the guests' sampling moments differ
            # slightly from the host's, which can push the difference out of range.
            self._previous_owner_percent = min(100.0, max(0.0, owner))
        # else: two reads within one clock tick; repeat the last figure.
        self._previous_at, self._previous_wall, self._previous_busy = now, wall, busy
        return HostReading(
            owner_cpu_percent=self._previous_owner_percent,
            total_memory_mib=self._fn.total_memory_bytes() // _MIB,
            cpu_count=cpu_count,
            on_battery=on_battery(self._fn.sensors_battery()),
            max_temperature_c=self._max_temperature(),
        )

    def _guest_cpu_seconds_since(self, previous_wall: float) -> float:
        """CPU-seconds the guests used since the previous read; updates the baseline."""
        total = 0.0
        seen: dict[int, ProcessCpu] = {}
        for pid in set(self._guest_pids()):
            current = self._fn.process_cpu(pid)
            if current is None:
                continue
            before = self._guests.get(pid)
            if before is not None and before.started_at == current.started_at:
                total += max(0.0, current.cpu_seconds - before.cpu_seconds)
            elif current.started_at >= previous_wall - NEW_GUEST_SLACK_S:
                total += current.cpu_seconds  # started within this interval
            # else: a guest that ran before we knew it: baseline now, count from next read.
            seen[pid] = current
        self._guests = seen
        return total

    def _max_temperature(self) -> float | None:
        sensors_temperatures = self._fn.sensors_temperatures
        if sensors_temperatures is None:
            return None
        try:
            return max_temperature(sensors_temperatures())
        except OSError:
            logger.debug("temperature sensors unreadable", exc_info=True)
            return None
