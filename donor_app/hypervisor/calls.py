"""Calling libvirt about a guest: its errors as `HypervisorError`, its state as `GuestState`.

The bottom of the package: `host.py` and `migration.py` both build on it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import libvirt

from donor_app.domain.guest import GuestState
from donor_app.hypervisor.errors import HypervisorError

_STATES = {
    libvirt.VIR_DOMAIN_RUNNING: GuestState.RUNNING,
    libvirt.VIR_DOMAIN_BLOCKED: GuestState.RUNNING,
    libvirt.VIR_DOMAIN_PAUSED: GuestState.PAUSED,
    libvirt.VIR_DOMAIN_SHUTDOWN: GuestState.RUNNING,
    libvirt.VIR_DOMAIN_SHUTOFF: GuestState.STOPPED,
    libvirt.VIR_DOMAIN_CRASHED: GuestState.FAILED,
    libvirt.VIR_DOMAIN_PMSUSPENDED: GuestState.PAUSED,
}


def state_of_code(code: int) -> GuestState:
    """The guest state for libvirt's state code (virDomainState)."""
    return _STATES.get(code, GuestState.OTHER)


def guest_state_of(dom: Any) -> GuestState:
    """A virDomain's state (raises libvirtError when libvirt no longer has it)."""
    return state_of_code(dom.state()[0])


@contextmanager
def libvirt_call(operation: str, guest: str | None) -> Iterator[None]:
    """Turn a `libvirtError` raised inside into a `HypervisorError` naming `operation`
    and `guest` (`not_found` set when libvirt has no such domain)."""
    try:
        yield
    except libvirt.libvirtError as exc:
        code = exc.get_error_code()
        error = HypervisorError(operation, guest, exc.get_error_message() or str(exc), code)
        error.not_found = code == libvirt.VIR_ERR_NO_DOMAIN
        raise error from exc
