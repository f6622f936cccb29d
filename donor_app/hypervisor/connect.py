"""Opening a libvirt connection the way donor_app needs it: libvirt's event loop running
first, an embedded QEMU driver configured to work alone, and libvirt's own printing of
errors to stderr silenced (ours are raised as `HypervisorError` and logged)."""

from __future__ import annotations

import urllib.parse
from pathlib import Path
from typing import Any

import libvirt

from donor_app.hypervisor.calls import libvirt_call
from donor_app.hypervisor.errors import HypervisorError
from donor_app.hypervisor.events import ensure_event_loop


def _silence_libvirt_stderr(_ctx: object, _err: object) -> None:
    """libvirt prints every error to stderr by default; ours are raised and logged instead."""


def prepare_embed_root(uri: str) -> None:
    """Give an embedded QEMU driver (qemu:///embed?root=DIR) a config that works alone.

    By default QEMU's output goes through virtlogd, a daemon an embedded driver is meant
    to do without; "file" writes it under the root instead.
    """
    parsed = urllib.parse.urlsplit(uri)
    if parsed.scheme != "qemu" or parsed.path != "/embed":
        return
    roots = urllib.parse.parse_qs(parsed.query).get("root")
    if not roots:
        raise HypervisorError("connect", None, f"{uri}: qemu:///embed needs ?root=DIR")
    config = Path(roots[0]) / "etc" / "qemu.conf"
    if not config.exists():
        config.parent.mkdir(parents=True, exist_ok=True)
        config.write_text(
            '# written by donor_app: no virtlogd for an embedded driver\nstdio_handler = "file"\n'
        )


def open_connection(uri: str) -> Any:
    """A virConnect to `uri` (HypervisorError if libvirt refuses)."""
    ensure_event_loop()  # before the first open: the embedded driver needs it
    prepare_embed_root(uri)
    libvirt.registerErrorHandler(_silence_libvirt_stderr, None)
    with libvirt_call("connect", None):
        return libvirt.open(uri)
