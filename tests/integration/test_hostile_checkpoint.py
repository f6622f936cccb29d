"""A checkpoint forged by a hostile donor: restored on another donor, it carries nothing of
the forgery there.

A donor writes the checkpoints it uploads, and its owner may have taken it over: the save
image (libvirt's header, the guest's domain XML, a cookie, then QEMU's stream) and a disk
guest's overlay are whatever that owner wants. Here a real guest is saved on one private
libvirtd (`tests/libvirtd.py`, "donor a"); the checkpoint is then forged as such an owner
would, with their own tools (the header rewritten by hand, overlays made with qemu-img),
and restored on a second libvirtd ("donor b") through the product's own path,
`Hypervisor.restore_elsewhere`. Host things the forgery points at are stand-ins this test
makes (a file, a loop device, a LAN bridge), so that nothing of the machine's own is
ever handed to a guest, except /etc, which is only ever named.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import struct
import subprocess
import tempfile
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from contextlib import suppress
from dataclasses import dataclass, replace
from pathlib import Path

import libvirt
import psutil
import pytest

from donor_app.domain.vm import DiskBoot, VmSpec
from donor_app.hypervisor.errors import HypervisorError
from donor_app.hypervisor.host import Hypervisor
from donor_app.hypervisor.images import ImageCache
from tests.guests import add_tiny_guest, console_ticks, shared_tmp_dir, tiny_guest_spec
from tests.libvirtd import LibvirtDaemon, running_libvirtd
from tests.waiting import wait_for

pytestmark = [pytest.mark.qemu, pytest.mark.slow]
_names = itertools.count()
QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
# libvirt's QEMU save image header (src/qemu/qemu_saveimage.h): magic, version, data_len,
# was_running, format, cookieOffset, 14 unused words; then data_len bytes holding the XML
# and the cookie (NUL-terminated, zero-padded), then QEMU's migration stream.
SAVE_HEADER = struct.Struct("<16s5I56x")
FW_CFG_MARKER = "opt/donor.example/forged"


@dataclass
class Donor:
    daemon: LibvirtDaemon
    hv: Hypervisor
    images: tuple[str, str]
    home: Path


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    path = shared_tmp_dir(Path(tempfile.mkdtemp(prefix="hc-", dir="/tmp")))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def donor_pair(workdir: Path) -> Iterator[tuple[Donor, Donor]]:
    with running_libvirtd(workdir, "a") as daemon_a, running_libvirtd(workdir, "b") as daemon_b:
        donors = []
        for daemon in (daemon_a, daemon_b):
            home = shared_tmp_dir(workdir / f"donor-{daemon.name}")
            cache = ImageCache(home / "images")
            images = add_tiny_guest(cache)
            hv = Hypervisor.open(daemon.uri, images=cache, state_dir=home / "state")
            donors.append(Donor(daemon, hv, images, home))
        try:
            yield donors[0], donors[1]
        finally:
            for donor in donors:
                with suppress(HypervisorError):
                    donor.hv.close()


@pytest.fixture
def donors(donor_pair: tuple[Donor, Donor]) -> Iterator[tuple[Donor, Donor]]:
    yield donor_pair
    for donor in donor_pair:
        for guest in donor.hv.list_guests():
            donor.hv.undefine(guest)


@dataclass
class HostThings:
    """Stand-ins for what a hostile checkpoint would hand its guest on another donor."""

    host_file: Path
    block_device: str
    lan_bridge: str

    def markers(self) -> list[str]:
        return [str(self.host_file), self.block_device, self.lan_bridge, FW_CFG_MARKER]


@pytest.fixture
def host_things(workdir: Path) -> Iterator[HostThings]:
    tag = uuid.uuid4().hex[:6]
    host_file = workdir / f"host-file-{tag}.img"
    host_file.write_bytes(b"the owner's data\n".ljust(1 << 20, b"\0"))
    backing = workdir / f"host-block-{tag}.img"
    backing.write_bytes(bytes(1 << 20))
    block_device = subprocess.run(
        ["losetup", "--find", "--show", str(backing)], capture_output=True, text=True, check=True
    ).stdout.strip()
    bridge = f"lan{tag}"  # "the LAN": a bridge nothing else is on
    subprocess.run(["ip", "link", "add", bridge, "type", "bridge"], check=True)
    try:
        yield HostThings(host_file, block_device, bridge)
    finally:
        subprocess.run(["ip", "link", "del", bridge], check=False)
        subprocess.run(["losetup", "--detach", block_device], check=False)


# --- the save image, as a hostile owner edits it ---------------------------------------------


def _read_image(path: Path) -> tuple[tuple[bytes, int, int, int, int, int], str, bytes]:
    with path.open("rb") as f:
        header = SAVE_HEADER.unpack(f.read(SAVE_HEADER.size))
        data = f.read(header[2])
    cookie_at = header[5] or len(data)
    return header, data[:cookie_at].split(b"\0", 1)[0].decode(), data[cookie_at:]


def _forge(path: Path, edit: Callable[[ET.Element], None]) -> None:
    """Rewrite the domain XML inside a save image, keeping its stream."""
    header, xml, cookie = _read_image(path)
    ET.register_namespace("qemu", QEMU_NS)
    domain = ET.fromstring(xml)
    edit(domain)
    new_xml = ET.tostring(domain, encoding="unicode").encode() + b"\0"
    magic, version, data_len, was_running, fmt, _ = header
    cookie = cookie.rstrip(b"\0")
    data = new_xml + (cookie + b"\0" if cookie else b"")
    assert len(data) <= data_len, "the forgery does not fit the image's header"
    cookie_offset = len(new_xml) if cookie else 0
    with path.open("r+b") as f:
        f.write(SAVE_HEADER.pack(magic, version, data_len, was_running, fmt, cookie_offset))
        f.write(data.ljust(data_len, b"\0"))


def _add_hostile_devices(things: HostThings) -> Callable[[ET.Element], None]:
    def edit(domain: ET.Element) -> None:
        devices = domain.find("devices")
        assert devices is not None
        for text in (
            # The host's /etc shared into the guest.
            "<filesystem type='mount' accessmode='passthrough'><source dir='/etc'/>"
            "<target dir='hostetc'/></filesystem>",
            # A host file and a host block device as the guest's disks.
            "<disk type='file' device='disk'><driver name='qemu' type='raw'/>"
            f"<source file='{things.host_file}'/><target dev='vdb' bus='virtio'/></disk>",
            "<disk type='block' device='disk'><driver name='qemu' type='raw'/>"
            f"<source dev='{things.block_device}'/><target dev='vdc' bus='virtio'/></disk>",
            # The guest on the LAN, and its screen for anyone who connects.
            "<interface type='bridge'><mac address='52:54:00:12:34:56'/>"
            f"<source bridge='{things.lan_bridge}'/><model type='virtio'/></interface>",
            "<graphics type='vnc' port='-1' autoport='yes' listen='0.0.0.0'>"
            "<listen type='address' address='0.0.0.0'/></graphics>",
            # A channel to a guest agent on the host.
            "<controller type='virtio-serial' index='0'/>",
            "<channel type='unix'><source mode='bind'/>"
            "<target type='virtio' name='org.qemu.guest_agent.0'/></channel>",
        ):
            devices.append(ET.fromstring(text))
        # QEMU run as root, unconfined.
        domain.append(
            ET.fromstring(
                "<seclabel type='static' model='dac' relabel='no'><label>+0:+0</label></seclabel>"
            )
        )
        # Any QEMU option at all.
        commandline = ET.SubElement(domain, f"{{{QEMU_NS}}}commandline")
        for value in ("-fw_cfg", f"name={FW_CFG_MARKER},string=1"):
            ET.SubElement(commandline, f"{{{QEMU_NS}}}arg", value=value)

    return edit


# --- what the target runs ------------------------------------------------------------------


def _live_xml(donor: Donor, guest: str) -> str:
    conn = libvirt.open(donor.daemon.uri)
    try:
        return str(conn.lookupByName(Hypervisor.domain_name(guest)).XMLDesc(0))
    finally:
        conn.close()


def _devices(xml: str) -> list[tuple[str, ...]]:
    """The guest's devices as the guest sees them: kind, type, model, bus, address."""
    devices = ET.fromstring(xml).find("devices")
    assert devices is not None
    seen = []
    for device in devices:
        if device.tag == "emulator":
            continue
        address = device.find("address")
        target = device.find("target")
        seen.append(
            (
                device.tag,
                device.get("type") or "",
                device.get("model") or "",
                target.get("bus") or "" if target is not None else "",
                " ".join(f"{k}={v}" for k, v in sorted(address.attrib.items()))
                if address is not None
                else "",
            )
        )
    return seen


def _start_guest(donor: Donor, **changes: object) -> VmSpec:
    spec = replace(tiny_guest_spec(f"h{next(_names)}", donor.images), **changes)  # type: ignore[arg-type]
    donor.hv.create(spec)
    _wait_ticking(donor, spec.name, beyond=2)
    return spec


def _wait_ticking(donor: Donor, guest: str, beyond: int) -> list[int]:
    console = donor.hv.console_path(guest)
    return wait_for(
        lambda: [t for t in console_ticks(console) if t > beyond] and console_ticks(console),
        60,
        f"{guest} on {donor.daemon.name} to print ticks beyond {beyond}",
        interval=0.05,
    )


def _domains_with_uuid(donor: Donor, domain_uuid: str) -> list[str]:
    conn = libvirt.open(donor.daemon.uri)
    try:
        return [dom.name() for dom in conn.listAllDomains() if dom.UUIDString() == domain_uuid]
    finally:
        conn.close()


def _owner(path: str | Path) -> tuple[int, int]:
    info = os.stat(path)
    return info.st_uid, info.st_gid


def test_a_forged_checkpoint_is_restored_only_as_the_spec_builds_it(
    donors: tuple[Donor, Donor], workdir: Path, host_things: HostThings
) -> None:
    a, b = donors
    spec = _start_guest(a)
    expected = _devices(_live_xml(a, spec.name))
    image = workdir / f"{spec.name}.save"
    a.hv.save(spec.name, image)
    saved_ticks = console_ticks(a.hv.console_path(spec.name))
    a.hv.undefine(spec.name)
    _forge(image, _add_hostile_devices(host_things))
    forged = _read_image(image)[1]
    assert "hostetc" in forged and FW_CFG_MARKER in forged  # the image carries the forgery
    owners = {path: _owner(path) for path in (host_things.host_file, host_things.block_device)}

    b.hv.restore_elsewhere(spec, image)

    live = _live_xml(b, spec.name)
    for marker in [*host_things.markers(), "hostetc", "0.0.0.0", "guest_agent", QEMU_NS]:
        assert marker not in live, marker
    assert _devices(live) == expected
    args = b.daemon.qemu_args(Hypervisor.domain_name(spec.name))
    assert args, "no QEMU runs the restored guest"
    command_line = " ".join(args)
    for marker in [*host_things.markers(), "/etc", "-vnc", "-fsdev", "fw_cfg", "netdev"]:
        assert marker not in command_line, marker
    pid = b.hv.usage(spec.name).pid
    assert pid is not None
    assert psutil.Process(pid).uids().real != 0, "QEMU runs as root"
    # libvirt never handed the stand-ins to QEMU (it would have given them to its user).
    assert {path: _owner(path) for path in owners} == owners
    # The guest itself came along: it counts on from where it was saved.
    after = _wait_ticking(b, spec.name, beyond=saved_ticks[-1])
    assert after[0] == saved_ticks[-1] + 1, (saved_ticks[-5:], after[:5])


def test_a_checkpoint_of_another_guest_than_its_spec_is_refused_and_leaves_nothing(
    donors: tuple[Donor, Donor], workdir: Path
) -> None:
    # The hostile donor uploads the state of a bigger guest than the workload it holds (say,
    # its own): the stream cannot be the guest the spec builds, so nothing runs.
    a, b = donors
    bigger = _start_guest(a, memory_mib=512)
    image = workdir / f"{bigger.name}.save"
    a.hv.save(bigger.name, image)
    a.hv.undefine(bigger.name)
    saved_uuid = ET.fromstring(_read_image(image)[1]).findtext("uuid")
    assert saved_uuid
    spec = replace(bigger, memory_mib=256)

    with pytest.raises(HypervisorError, match=rf"^restore guest '{spec.name}': ") as caught:
        b.hv.restore_elsewhere(spec, image)

    assert caught.value.guest == spec.name
    assert not b.hv.exists(spec.name)
    assert _domains_with_uuid(b, saved_uuid) == []
    assert not b.hv.guest_dir(spec.name).exists()
    assert b.daemon.qemu_args(Hypervisor.domain_name(spec.name)) == []


# --- disk overlays --------------------------------------------------------------------------


def _qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


@dataclass
class DiskCheckpoint:
    spec: VmSpec
    save: Path
    base: Path


@pytest.fixture(scope="module")
def disk_checkpoint(donor_pair: tuple[Donor, Donor], workdir: Path) -> DiskCheckpoint:
    """A disk guest saved on donor a (its save image only; each test brings an overlay)."""
    a, b = donor_pair
    base = workdir / "base.qcow2"
    _qemu_img("create", "-q", "-f", "qcow2", str(base), "64M")
    sha = a.hv.images.add_file(base)
    assert b.hv.images.add_file(base) == sha
    spec = VmSpec(f"hd{next(_names)}", 1, 256, DiskBoot(sha))
    a.hv.create(spec)
    save = workdir / f"{spec.name}.save"
    a.hv.save(spec.name, save)
    a.hv.undefine(spec.name)
    return DiskCheckpoint(spec, save, base)


def _sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _overlay_with_data_file(where: Path, base: Path) -> Path:
    # `qemu-img create -o data_file=F` truncates F: made against a stand-in, then renamed to
    # /etc/passwd in the header (amend opens the old data file, never the new one).
    overlay = where / "disk.qcow2"
    stand_in = where / "stand-in"
    _qemu_img(
        "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(base),
        "-o", f"data_file={stand_in}", str(overlay), "64M",
    )  # fmt: skip
    _qemu_img("amend", "-f", "qcow2", "-o", "data_file=/etc/passwd", str(overlay))
    return overlay


def _overlay_on_a_host_file(where: Path, base: Path) -> Path:
    overlay = where / "disk.qcow2"
    _qemu_img("create", "-q", "-f", "qcow2", "-F", "raw", "-b", "/etc/hostname", str(overlay))
    return overlay


def _overlay_on_a_chain_of_two(where: Path, base: Path) -> Path:
    middle = where / "middle.qcow2"
    _qemu_img("create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(base), str(middle))
    overlay = where / "disk.qcow2"
    _qemu_img("create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(middle), str(overlay))
    return overlay


def _raw_file_named_qcow2(where: Path, base: Path) -> Path:
    overlay = where / "disk.qcow2"
    overlay.write_bytes(b"\0" * (1 << 20))
    return overlay


def _overlay_on_a_json_backing(where: Path, base: Path) -> Path:
    overlay = where / "disk.qcow2"
    backing = json.dumps({"driver": "raw", "file": {"driver": "file", "filename": "/etc/shadow"}})
    _qemu_img(
        "create", "-q", "-f", "qcow2", "-u", "-F", "raw", "-b", f"json:{backing}",
        str(overlay), "64M",
    )  # fmt: skip
    return overlay


@pytest.mark.parametrize(
    ("make_overlay", "refusal"),
    [
        (_overlay_with_data_file, "external data file"),
        (_overlay_on_a_host_file, "backing file"),
        (_overlay_on_a_chain_of_two, "backing file"),
        (_raw_file_named_qcow2, "not a qcow2 image"),
        (_overlay_on_a_json_backing, "backing file"),
    ],
)
def test_a_disk_overlay_that_points_at_host_files_is_refused(
    donors: tuple[Donor, Donor],
    disk_checkpoint: DiskCheckpoint,
    workdir: Path,
    make_overlay: Callable[[Path, Path], Path],
    refusal: str,
) -> None:
    _, b = donors
    spec = disk_checkpoint.spec
    unpacked = workdir / f"unpacked-{next(_names)}"
    unpacked.mkdir()
    # As the donor made it, with the path its own cache gives the base image.
    overlay = make_overlay(unpacked, disk_checkpoint.base)
    host_files = {path: _sha256(path) for path in ("/etc/passwd", "/etc/hostname")}

    with pytest.raises(HypervisorError, match=rf"^restore guest '{spec.name}': .*{refusal}"):
        b.hv.restore_elsewhere(spec, disk_checkpoint.save, disk_overlay=overlay)

    assert not b.hv.exists(spec.name)
    assert not b.hv.guest_dir(spec.name).exists()
    assert {path: _sha256(path) for path in host_files} == host_files
