"""libvirt's domain states read as the domain's guest states."""

from __future__ import annotations

import libvirt
import pytest

from donor_app.domain.guest import GuestState
from donor_app.hypervisor.calls import state_of_code


@pytest.mark.parametrize(
    ("code", "state"),
    [
        (libvirt.VIR_DOMAIN_RUNNING, GuestState.RUNNING),
        (libvirt.VIR_DOMAIN_BLOCKED, GuestState.RUNNING),
        (libvirt.VIR_DOMAIN_SHUTDOWN, GuestState.RUNNING),
        (libvirt.VIR_DOMAIN_PAUSED, GuestState.PAUSED),
        (libvirt.VIR_DOMAIN_PMSUSPENDED, GuestState.PAUSED),
        (libvirt.VIR_DOMAIN_SHUTOFF, GuestState.STOPPED),
        (libvirt.VIR_DOMAIN_CRASHED, GuestState.FAILED),
        (libvirt.VIR_DOMAIN_NOSTATE, GuestState.OTHER),
        (99, GuestState.OTHER),
    ],
)
def test_libvirt_state_codes(code: int, state: GuestState) -> None:
    assert state_of_code(code) is state
