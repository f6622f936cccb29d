"""Each guest's CPU cap: cputune's vcpu_quota where the driver has it, else a
suspend/resume duty cycle (dutycycle.py) that does the same job.

`CpuCaps` keeps the cap in force per guest and the running duty cycles; `Hypervisor`
decides when to pause, resume or cap and calls it with the guest's virDomain.
"""

from __future__ import annotations

import logging
import math
import threading
from typing import Any, Literal

import libvirt

from donor_app.domain.guest import GuestState
from donor_app.hypervisor.calls import guest_state_of
from donor_app.hypervisor.dutycycle import DutyCycler
from donor_app.hypervisor.errors import HypervisorError

log = logging.getLogger(__name__)

CPU_PERIOD_US = 100_000  # cputune vcpu_period: the window the quota is measured over
MIN_QUOTA_US = 1_000  # libvirt refuses smaller vcpu_quota values
CpuCapMode = Literal["auto", "cputune", "duty-cycle"]


def check_cpu_percent(percent: float) -> float:
    if (
        isinstance(percent, bool)
        or not isinstance(percent, int | float)
        or not math.isfinite(percent)
        or not 0 <= percent <= 100
    ):
        raise ValueError(f"cpu_percent: {percent!r} is outside the allowed range 0–100 %")
    return float(percent)


class CpuCaps:
    """The caps of one connection's guests (percent of each guest's vCPUs). Thread-safe.

    `mode` "auto" uses cputune and switches to the duty cycle for good the first time
    the driver refuses it; "cputune" raises instead.
    """

    def __init__(self, uri: str, mode: CpuCapMode) -> None:
        self._uri = uri
        self._mode: CpuCapMode = mode
        self._lock = threading.Lock()
        self._caps: dict[str, float] = {}
        self._duty: dict[str, DutyCycler] = {}

    @property
    def duty_cycling(self) -> bool:
        """Whether caps are made with the duty cycle (the driver has no cputune)."""
        return self._mode == "duty-cycle"

    def get(self, guest: str) -> float:
        """The cap in force, 100 when uncapped."""
        with self._lock:
            return self._caps.get(guest, 100.0)

    def replace(self, guest: str, percent: float) -> float:
        """Record `percent` as the guest's cap; returns the cap it had."""
        with self._lock:
            previous = self._caps.get(guest, 100.0)
            self._caps[guest] = percent
        return previous

    def drop(self, guest: str) -> None:
        """Forget a guest that is gone from this host."""
        with self._lock:
            self._caps.pop(guest, None)

    def cycling(self, guest: str) -> bool:
        """Whether a duty cycle runs the guest now."""
        with self._lock:
            return guest in self._duty

    def set_quota(self, guest: str, dom: Any, percent: float) -> bool:
        """Cap with cputune; False when the driver has none (now in duty-cycle mode)."""
        quota = -1 if percent >= 100 else max(MIN_QUOTA_US, round(CPU_PERIOD_US * percent / 100))
        try:
            dom.setSchedulerParametersFlags(
                {"vcpu_period": CPU_PERIOD_US, "vcpu_quota": quota},
                libvirt.VIR_DOMAIN_AFFECT_LIVE,
            )
        except libvirt.libvirtError as exc:
            if self._mode == "cputune":
                raise HypervisorError(
                    "set_cpu_cap", guest, exc.get_error_message(), exc.get_error_code()
                ) from exc
            log.info(
                "cputune unavailable on %s (%s): capping CPU with a suspend/resume duty cycle",
                self._uri,
                exc.get_error_message(),
            )
            self._mode = "duty-cycle"
            return False
        return True

    def start_duty(self, guest: str, dom: Any, percent: float) -> None:
        """Run the guest `percent` of the time (or change a running cycle's share)."""
        with self._lock:
            cycler = self._duty.get(guest)
            if cycler is not None:
                cycler.set_percent(percent)
                return

            def on_error(_exc: Exception) -> None:
                with self._lock:
                    if self._duty.get(guest) is cycler:
                        del self._duty[guest]

            cycler = DutyCycler(guest, dom.suspend, dom.resume, percent, on_error=on_error)
            self._duty[guest] = cycler
        cycler.start()

    def stop_duty(self, guest: str) -> None:
        with self._lock:
            cycler = self._duty.pop(guest, None)
        if cycler is not None:
            cycler.stop()

    def restart_duty(self, guest: str, dom: Any) -> None:
        """Put a duty-cycle cap back on a guest that stayed here, running."""
        cap = self.get(guest)
        if not (0 < cap < 100 and self.duty_cycling):
            return
        try:
            running = guest_state_of(dom) is GuestState.RUNNING
        except libvirt.libvirtError:
            return
        if running:
            self.start_duty(guest, dom, cap)

    def stop_all(self) -> None:
        """Stop every duty cycle (the guests keep running)."""
        with self._lock:
            guests = list(self._duty)
        for guest in guests:
            self.stop_duty(guest)
