"""A checkpoint's definition from another host: what of it a restore keeps (xml.saved_guest),
and the save image around it (save_image.py), read and rewritten without libvirt."""

from __future__ import annotations

import struct
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from donor_app.domain.vm import KernelBoot, VmSpec
from donor_app.hypervisor import save_image
from donor_app.hypervisor.save_image import SaveImage, SaveImageError
from donor_app.hypervisor.xml import BootFiles, SavedGuest, build_domain_xml, saved_guest

SPEC = VmSpec("w1", 1, 256, KernelBoot("1" * 64, "2" * 64, "console=ttyS0"), network=True)
FILES = BootFiles(kernel=Path("/here/k"), initrd=Path("/here/i"))
UUID = "1b4e28ba-2fa1-41d2-883f-0016d3cca427"

# What a hostile donor's checkpoint may say about the guest: the few values a restore
# needs, among everything it must not get.
HOSTILE_XML = f"""<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>donor-w1</name>
  <uuid>{UUID}</uuid>
  <memory unit='KiB'>67108864</memory>
  <vcpu>64</vcpu>
  <os><type arch='x86_64' machine='pc-i440fx-7.2'>hvm</type>
    <kernel>/etc/shadow</kernel><cmdline>init=/bin/sh</cmdline></os>
  <seclabel type='none'/>
  <devices>
    <emulator>/usr/bin/python3</emulator>
    <disk type='block' device='disk'><source dev='/dev/sda'/><target dev='vdb'/></disk>
    <filesystem type='mount'><source dir='/'/><target dir='root'/></filesystem>
    <hostdev mode='subsystem' type='usb'><source><vendor id='0x1d6b'/></source></hostdev>
    <interface type='bridge'><mac address='52:54:00:12:34:56'/><source bridge='br-lan'/>
      <model type='virtio'/></interface>
    <graphics type='vnc' listen='0.0.0.0'/>
    <channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>
  </devices>
  <qemu:commandline><qemu:arg value='-fw_cfg'/></qemu:commandline>
</domain>"""


def _saved(xml: str = HOSTILE_XML, *, cookie: str | None = None, virt_type: str = "qemu"):
    return saved_guest(xml, cookie, spec=SPEC, domain_name="donor-w1", virt_type=virt_type)


def test_only_the_uuid_machine_and_mac_are_kept_and_the_rest_comes_from_the_spec():
    saved = _saved()
    assert saved == SavedGuest(UUID, "pc-i440fx-7.2", "52:54:00:12:34:56")
    xml = build_domain_xml(
        SPEC,
        domain_name="donor-w1",
        virt_type="qemu",
        files=FILES,
        console_log=Path("/here/console.log"),
        saved=saved,
    )
    rebuilt = build_domain_xml(
        SPEC,
        domain_name="donor-w1",
        virt_type="qemu",
        files=FILES,
        console_log=Path("/here/console.log"),
    )
    for text in ("/etc/shadow", "/bin/sh", "/dev/sda", "br-lan", "0.0.0.0", "python3", "qemu:"):
        assert text not in xml
    root = ET.fromstring(xml)
    assert root.findtext("uuid") == UUID
    assert root.find("os/type").get("machine") == "pc-i440fx-7.2"  # type: ignore[union-attr]
    assert root.find("devices/interface/mac").get("address") == "52:54:00:12:34:56"  # type: ignore[union-attr]
    assert root.findtext("memory") == "256" and root.findtext("vcpu") == "1"
    # Apart from those three values, exactly what the spec builds for a guest defined here.
    root.remove(root.find("uuid"))  # type: ignore[arg-type]
    del root.find("os/type").attrib["machine"]  # type: ignore[union-attr]
    interface = root.find("devices/interface")
    assert interface is not None
    interface.remove(interface.find("mac"))  # type: ignore[arg-type]
    assert ET.tostring(root) == ET.tostring(ET.fromstring(rebuilt))


def test_no_mac_is_kept_for_a_guest_without_a_network():
    spec = VmSpec("w1", 1, 256, SPEC.boot)
    saved = saved_guest(HOSTILE_XML, None, spec=spec, domain_name="donor-w1", virt_type="qemu")
    assert saved.mac is None


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (("<name>donor-w1</name>", "<name>donor-w2</name>"), "name"),
        (("type='qemu'", "type='kvm'"), "type"),
        (("arch='x86_64'", "arch='aarch64'"), "os.type.arch"),
        (("pc-i440fx-7.2", "pc-i440fx-7.2,accel=kvm"), "os.type.machine"),
        (("pc-i440fx-7.2", "microvm"), "os.type.machine"),
        ((UUID, "not-a-uuid"), "uuid"),
        ((UUID, "00000000-0000-0000-0000-000000000000"), "uuid"),
        (("52:54:00:12:34:56", "01:00:5e:00:00:01"), "devices.interface.mac"),
        (("52:54:00:12:34:56", "52:54:00:12:34"), "devices.interface.mac"),
    ],
)
def test_a_definition_that_does_not_fit_is_refused(change: tuple[str, str], field: str):
    with pytest.raises(ValueError, match=rf"^{field}: "):
        _saved(HOSTILE_XML.replace(*change))


def test_under_kvm_the_cpu_features_the_guest_saw_come_along_checked():
    xml = HOSTILE_XML.replace("type='qemu'", "type='kvm'")
    cookie = (
        "<cookie><cpu mode='custom' match='exact' check='partial'>"
        "<model fallback='forbid'>Nehalem</model>"
        "<feature policy='require' name='x2apic'/><feature policy='disable' name='vme'/>"
        "</cpu><slirpHelper/></cookie>"
    )
    saved = _saved(xml, cookie=cookie, virt_type="kvm")
    assert saved.cpu_features == (("require", "x2apic"), ("disable", "vme"))
    built = build_domain_xml(
        SPEC,
        domain_name="donor-w1",
        virt_type="kvm",
        files=FILES,
        console_log=Path("/c"),
        saved=saved,
    )
    cpu = ET.fromstring(built).find("cpu")
    assert cpu is not None and cpu.findtext("model") == "Nehalem"
    assert [(f.get("policy"), f.get("name")) for f in cpu.findall("feature")] == [
        ("require", "x2apic"),
        ("disable", "vme"),
    ]
    for bad in (
        "<cookie><cpu mode='host-passthrough'/></cookie>",
        "<cookie><cpu><model>Skylake-Server</model></cpu></cookie>",
        "<cookie><cpu><model>Nehalem</model><feature policy='force' name='vmx'/></cpu></cookie>",
        "<cookie><cpu><model>Nehalem</model><feature policy='require' name='a b'/></cpu></cookie>",
        "<cookie",
    ):
        with pytest.raises(ValueError, match=r"^cookie"):
            _saved(xml, cookie=bad, virt_type="kvm")


def test_under_tcg_the_cookie_is_not_read():
    # The CPU is pinned whole under TCG: a cookie has nothing to add, whatever it says.
    saved = _saved(cookie="<cookie><cpu mode='host-passthrough'/></cookie>")
    assert saved.cpu_features == ()


# --- the save image ------------------------------------------------------------------------

HEADER = struct.Struct("<16s5I56x")
STREAM = b"QEVM\x00\x00\x00\x03" + bytes(range(256)) * 4


def _image(
    path: Path,
    xml: str = "<domain/>",
    cookie: str | None = "<cookie/>",
    *,
    magic: bytes = b"LibvirtQemudSave",
    version: int = 2,
    fmt: int = 0,
    was_running: int = 1,
    data_len: int | None = None,
    cookie_offset: int | None = None,
) -> Path:
    data = xml.encode() + b"\0"
    offset = len(data) if cookie is not None else 0
    if cookie is not None:
        data += cookie.encode() + b"\0"
    length = len(data) + 64 * 1024 if data_len is None else data_len
    header = HEADER.pack(
        magic,
        version,
        length,
        was_running,
        fmt,
        offset if cookie_offset is None else cookie_offset,
    )
    path.write_bytes(header + data.ljust(length, b"\0")[:length] + STREAM)
    return path


def test_a_save_image_is_read_and_rewritten_keeping_its_stream(tmp_path: Path):
    path = _image(tmp_path / "s", "<domain>theirs</domain>", "<cookie><cpu/></cookie>")
    image = save_image.read(path)
    assert image == SaveImage(
        data_len=image.data_len,
        was_running=True,
        xml="<domain>theirs</domain>",
        cookie="<cookie><cpu/></cookie>",
    )
    save_image.rewrite(path, image, "<domain>ours</domain>\n")
    again = save_image.read(path)
    assert again == SaveImage(image.data_len, True, "<domain>ours</domain>\n", None)
    assert path.read_bytes().endswith(STREAM)
    assert path.stat().st_size == HEADER.size + image.data_len + len(STREAM)


@pytest.mark.parametrize(
    ("kwargs", "refusal"),
    [
        ({"magic": b"LibvirtQemudPart"}, "did not finish"),
        ({"magic": b"TestGuestMagic\0\0"}, "not a QEMU save image"),
        ({"version": 3}, "version 3"),
        ({"fmt": 1}, "uncompressed"),
        ({"fmt": 4}, "uncompressed"),
        ({"was_running": 7}, "was_running"),
        ({"data_len": 64 * 1024 * 1024}, "data_len"),
        ({"data_len": 0}, "data_len"),
        ({"cookie_offset": 200_000}, "cookieOffset"),
        ({"xml": "<domain>\u00e9", "cookie": None, "data_len": 9}, "not NUL-terminated"),
    ],
)
def test_what_is_not_a_save_image_this_host_restores_is_refused(
    tmp_path: Path, kwargs: dict[str, object], refusal: str
):
    path = _image(tmp_path / "s", **kwargs)  # type: ignore[arg-type]
    with pytest.raises(SaveImageError, match=refusal):
        save_image.read(path)


def test_a_short_or_cut_save_image_is_refused(tmp_path: Path):
    short = tmp_path / "short"
    short.write_bytes(b"LibvirtQemudSave")
    with pytest.raises(SaveImageError, match="too short"):
        save_image.read(short)
    cut = _image(tmp_path / "cut")
    cut.write_bytes(cut.read_bytes()[: HEADER.size + 100])
    with pytest.raises(SaveImageError, match="ends after 100 bytes"):
        save_image.read(cut)


def test_a_definition_too_large_for_the_image_is_refused(tmp_path: Path):
    path = _image(tmp_path / "s", data_len=64)
    image = save_image.read(path)
    with pytest.raises(SaveImageError, match="do not fit"):
        save_image.rewrite(path, image, "<domain>" + "x" * 100 + "</domain>")
    assert save_image.read(path) == image  # left as it was
