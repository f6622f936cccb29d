"""Before donor-app is removed: save its guests to disk (libvirt managed save).

The stopped agent leaves its guests paused in libvirtd, holding their RAM. Removal
saves them instead, so the machine gets its memory back while the guests keep their
state for a later install, or for the coordinator to place again from its checkpoint.
Only donor_app's own domains (named donor-*) are touched, through the product's own
hypervisor layer. Runs with the installed tree's python (prerm, install.sh --uninstall)
after the agent has stopped; best effort: a guest that cannot be saved stays paused,
which is still safe, and is named in the output.

    checkpoint-guests [--uri URI]   # default: qemu:///system when libvirtd runs, else none

Exit codes: 0 (also when there is nothing to do), 1 some guests could not be saved,
2 usage.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from donor_app.hypervisor.errors import HypervisorError
from donor_app.hypervisor.host import GuestState, Hypervisor
from donor_app.hypervisor.images import ImageCache

SYSTEM_SOCKET = Path("/run/libvirt/libvirt-sock")
STATE_DIR = Path("/var/lib/donor_app/guests-state")
IMAGES = Path("/var/cache/donor_app/images")


def default_uri() -> str | None:
    """qemu:///system where libvirtd runs. Without it the agent used an embedded driver,
    whose guests do not outlive the agent: nothing is left to save."""
    return "qemu:///system" if SYSTEM_SOCKET.exists() else None


def checkpoint(uri: str) -> tuple[list[str], list[str]]:
    """Managed-save every running or paused donor_app guest on `uri`: (saved, failed)."""
    hv = Hypervisor.open(uri, images=ImageCache(IMAGES), state_dir=STATE_DIR)
    saved, failed = [], []
    try:
        for guest in hv.list_guests():
            if hv.state(guest) not in (GuestState.RUNNING, GuestState.PAUSED):
                continue
            try:
                hv.managed_save(guest)
                saved.append(guest)
            except HypervisorError as error:
                failed.append(f"{guest} ({error})")
    finally:
        hv.close()
    return saved, failed


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="checkpoint-guests", description=__doc__)
    parser.add_argument("--uri", help="libvirt URI (default: qemu:///system if libvirtd runs)")
    args = parser.parse_args(argv)
    uri = args.uri or default_uri()
    if uri is None:
        return 0
    try:
        saved, failed = checkpoint(uri)
    except Exception as error:  # removal goes on: the guests stay paused, which is safe
        print(f"donor-app: cannot checkpoint the guests on {uri}: {error}", file=sys.stderr)
        return 1
    for guest in saved:
        print(f"donor-app: guest {guest} saved to disk (libvirt managed save)", file=sys.stderr)
    for guest in failed:
        print(f"donor-app: guest {guest} could not be saved; left paused", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
