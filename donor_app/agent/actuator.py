"""Carries a Decision out on the guests: the throttle → pause → checkpoint ladder.

The caps of a Decision are for the whole host (CPU percent of all cores, MiB of RAM);
the hypervisor caps each guest (percent of its own vCPUs, its balloon). The division is
pure (`guest_cpu_caps`, `guest_memory_caps`); `Actuator` does the calls and keeps going
when one guest fails: each distinct failure is logged once, never in a loop.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

from donor_app.domain.decision import Decision, Level
from donor_app.domain.guest import GuestInfo, GuestState, GuestUsage
from donor_app.hypervisor.errors import HypervisorError

log = logging.getLogger(__name__)

# The balloon is never asked below this: the tiny guest needs it to stay alive, and a
# guest squeezed further only swaps or crashes (one with 64 MiB or less does not boot).
MIN_BALLOON_MIB = 128


class Guests(Protocol):
    """The hypervisor operations the agent uses (`donor_app.hypervisor.Hypervisor`).

    Called from the engine thread only; each call may block for a few milliseconds
    (suspend/resume/cap) up to seconds (managed save).
    """

    def list_guests(self) -> list[str]: ...
    def info(self, guest: str) -> GuestInfo: ...
    def state(self, guest: str) -> GuestState: ...
    def usage(self, guest: str) -> GuestUsage: ...
    def suspend(self, guest: str) -> None: ...
    def resume(self, guest: str) -> None: ...
    def set_cpu_cap(self, guest: str, percent: float) -> None: ...
    def cpu_cap(self, guest: str) -> float: ...
    def set_memory_cap(self, guest: str, memory_mib: int) -> None: ...
    def managed_save(self, guest: str) -> None: ...
    def has_managed_save(self, guest: str) -> bool: ...
    def start(self, guest: str) -> None: ...
    def guest_pids(self) -> list[int]: ...
    def console_path(self, guest: str) -> Path: ...


def guest_cpu_caps(
    host_cpu_percent: float, host_cores: int, vcpus: Mapping[str, int]
) -> dict[str, float]:
    """Share `host_cpu_percent` of `host_cores` among guests by their vCPU counts.

    Returns each guest's cap in percent of its own vCPUs (0–100), e.g. 25 % of a 2-core
    host is half a core; one 1-vCPU guest then gets 50 %.
    """
    total_vcpus = sum(vcpus.values())
    if total_vcpus == 0:
        return {}
    cores_allowed = max(0, host_cores) * max(0.0, host_cpu_percent) / 100
    percent = min(100.0, round(100 * cores_allowed / total_vcpus, 1))
    return dict.fromkeys(vcpus, percent)


def guest_memory_caps(memory_mib: int, max_memory: Mapping[str, int]) -> dict[str, int]:
    """Share `memory_mib` among guests in proportion to their defined memory."""
    total = sum(max_memory.values())
    if total == 0:
        return {}
    return {
        guest: min(size, max(MIN_BALLOON_MIB, memory_mib * size // total))
        for guest, size in max_memory.items()
    }


class Actuator:
    """Applies decisions to the guests through `Guests`. Engine thread only."""

    def __init__(self, guests: Guests) -> None:
        self._guests = guests
        self._info: dict[str, GuestInfo] = {}
        self._memory_target: dict[str, int] = {}
        self._logged: set[tuple[str, str, str]] = set()

    def _report(self, guest: str, operation: str, error: HypervisorError) -> None:
        key = (guest, operation, error.detail)
        if key not in self._logged:
            self._logged.add(key)
            log.warning("%s", error)

    def known(self, names: list[str]) -> dict[str, GuestInfo]:
        """Sizes of the guests in `names`, looked up once per guest."""
        for gone in set(self._info) - set(names):
            del self._info[gone]
            self._memory_target.pop(gone, None)
        for name in names:
            if name not in self._info:
                try:
                    self._info[name] = self._guests.info(name)
                except HypervisorError as error:
                    self._report(name, "info", error)
        return {name: self._info[name] for name in names if name in self._info}

    def pause_all(self, names: list[str]) -> None:
        """The fast path: suspend every guest, nothing else (no lookups, no caps)."""
        for name in names:
            try:
                self._guests.suspend(name)
            except HypervisorError as error:
                self._report(name, "suspend", error)

    def apply(self, decision: Decision, names: list[str], host_cores: int) -> None:
        """Bring every guest in line with `decision`."""
        if decision.level in (Level.PAUSED, Level.EVACUATE):
            # EVACUATE: paused here until a coordinator moves the guests away.
            self.pause_all(names)
            return
        if decision.level is Level.CHECKPOINT:
            self._checkpoint_all(names)
            return
        info = self.known(names)
        cpu_caps = guest_cpu_caps(
            decision.caps.cpu_percent, host_cores, {n: i.vcpus for n, i in info.items()}
        )
        memory_caps = guest_memory_caps(
            decision.caps.memory_mib, {n: i.max_memory_mib for n, i in info.items()}
        )
        for name in info:
            try:
                self._run(name, cpu_caps[name], memory_caps[name])
            except HypervisorError as error:
                self._report(name, error.operation, error)

    def _run(self, name: str, cpu_cap: float, memory_mib: int) -> None:
        state = self._guests.state(name)
        if state is GuestState.STOPPED:
            if not self._guests.has_managed_save(name):
                return  # stopped by someone else: not ours to start
            log.info("restoring %s from its checkpoint", name)
            self._guests.start(name)
        if self._memory_target.get(name) != memory_mib:
            self._guests.set_memory_cap(name, memory_mib)
            self._memory_target[name] = memory_mib
        self._guests.set_cpu_cap(name, cpu_cap)
        if cpu_cap > 0:
            self._guests.resume(name)

    def _checkpoint_all(self, names: list[str]) -> None:
        for name in names:
            try:
                if self._guests.state(name) is not GuestState.STOPPED:
                    log.info("checkpointing %s to disk to free its memory", name)
                    self._guests.managed_save(name)
                    self._memory_target.pop(name, None)
            except HypervisorError as error:
                self._report(name, "managed_save", error)
