"""Hypervisors for the contract suite: a real QEMU guest and libvirt's test:/// driver."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from donor_app.hypervisor.host import Hypervisor
from donor_app.hypervisor.images import ImageCache
from tests.guests import add_tiny_guest, qemu_uri, shared_tmp_dir

# libvirt allows one embedded QEMU driver per process, so the QEMU hypervisor is opened
# once per test session; tests use their own guest names and remove their guests.


@dataclass
class Backend:
    hv: Hypervisor
    images: tuple[str, str]
    real_qemu: bool
    workdir: Path


def _open(uri_for: str) -> Iterator[Backend]:
    # Short path under /tmp: QEMU's monitor socket path must stay under 108 bytes.
    workdir = shared_tmp_dir(Path(tempfile.mkdtemp(prefix="dv-", dir="/tmp")))
    cache = ImageCache(workdir / "images")
    images = add_tiny_guest(cache)
    if uri_for == "qemu":
        uri = qemu_uri(workdir / "root")
    else:
        node = workdir / "node.xml"
        node.write_text("<node/>\n")
        uri = f"test://{node}"
    hv = Hypervisor.open(uri, images=cache, state_dir=workdir / "state")
    try:
        yield Backend(hv, images, uri_for == "qemu", workdir)
    finally:
        for guest in hv.list_guests():
            hv.undefine(guest)
        hv.close()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="session")
def qemu_backend() -> Iterator[Backend]:
    yield from _open("qemu")


@pytest.fixture(scope="session")
def test_driver_backend() -> Iterator[Backend]:
    yield from _open("test")


@pytest.fixture(params=["qemu", "test"])
def backend(request: pytest.FixtureRequest) -> Backend:
    name = "qemu_backend" if request.param == "qemu" else "test_driver_backend"
    return request.getfixturevalue(name)  # type: ignore[no-any-return]
