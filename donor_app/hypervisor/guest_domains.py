"""Our guests' libvirt domains, found by guest name, and their QEMU processes.

A guest `<name>` is the libvirt domain `donor-<name>`, so the owner's own VMs on the same
libvirt are never listed or touched. A guest's virDomain and its QEMU process are looked
up once and cached (a lookup per call would sit on the pause path); a call that finds
the domain gone forgets both.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import libvirt

from donor_app.hypervisor import process
from donor_app.hypervisor.calls import libvirt_call
from donor_app.hypervisor.errors import HypervisorError

DOMAIN_PREFIX = "donor-"


def domain_name(guest: str) -> str:
    return DOMAIN_PREFIX + guest


def guest_name(name: str) -> str | None:
    """The guest a libvirt domain name stands for, None for a domain not ours."""
    return name.removeprefix(DOMAIN_PREFIX) if name.startswith(DOMAIN_PREFIX) else None


class GuestDomains:
    """The guests' domains on one libvirt connection. Thread-safe."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self._lock = threading.Lock()
        self._domains: dict[str, Any] = {}
        self._processes: dict[str, process.ProcessRef] = {}

    def lookup(self, operation: str, guest: str) -> Any:
        """The guest's virDomain (HypervisorError with `not_found` if libvirt has none)."""
        with self._lock:
            dom = self._domains.get(guest)
        if dom is not None:
            return dom
        try:
            dom = self.conn.lookupByName(domain_name(guest))
        except libvirt.libvirtError as exc:
            code = exc.get_error_code()
            if code == libvirt.VIR_ERR_NO_DOMAIN:
                error = HypervisorError(
                    operation,
                    guest,
                    "no such guest (never defined here, or already removed)",
                    code,
                )
                error.not_found = True
                raise error from exc
            raise HypervisorError(operation, guest, exc.get_error_message(), code) from exc
        with self._lock:
            self._domains[guest] = dom
        return dom

    @contextmanager
    def call(self, operation: str, guest: str) -> Iterator[None]:
        """Like `libvirt_call`, and forgets a cached domain that libvirt no longer has."""
        try:
            with libvirt_call(operation, guest):
                yield
        except HypervisorError as exc:
            if exc.not_found:
                self.forget(guest)
            raise

    def forget(self, guest: str) -> None:
        with self._lock:
            self._domains.pop(guest, None)
            self._processes.pop(guest, None)

    def exists(self, guest: str) -> bool:
        """Whether libvirt has this guest now (asks libvirt, not the cache)."""
        self.forget(guest)
        try:
            self.lookup("lookup", guest)
        except HypervisorError as exc:
            if exc.not_found:
                return False
            raise
        return True

    def names(self) -> list[str]:
        """Every guest of ours that libvirt has defined, sorted."""
        with libvirt_call("list", None):
            domains = self.conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_PERSISTENT)
        names = (guest_name(dom.name()) for dom in domains)
        return sorted(name for name in names if name is not None)

    def qemu_process(self, guest: str, dom: Any) -> process.ProcessRef | None:
        """The running guest's QEMU process, None when it has none (not running, or a
        driver without one such as test:///)."""
        with self._lock:
            ref = self._processes.get(guest)
        if ref is not None and process.still_running(ref):
            return ref
        with self.call("usage", guest):
            if not dom.isActive():
                return None
            uuid = dom.UUIDString()
        ref = process.find_qemu_process(uuid)
        with self._lock:
            if ref is None:
                self._processes.pop(guest, None)
            else:
                self._processes[guest] = ref
        return ref
