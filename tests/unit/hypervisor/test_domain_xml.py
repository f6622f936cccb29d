"""Domain XML from a VmSpec: golden files, plus the sandbox's promises checked directly.

Regenerate the golden files after an intended change with
`DONOR_UPDATE_GOLDEN=1 pytest tests/unit/hypervisor/test_domain_xml.py` and review the diff.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from donor_app.domain.vm import DiskBoot, KernelBoot, VmSpec
from donor_app.hypervisor.xml import (
    BootFiles,
    build_domain_xml,
    build_isolated_network_xml,
    domain_virt_type,
    network_name,
)

GOLDEN = Path(__file__).with_name("golden")
KERNEL_SHA, INITRD_SHA, DISK_SHA = "1" * 64, "2" * 64, "3" * 64
KERNEL_SPEC = VmSpec(
    "tiny", 1, 256, KernelBoot(KERNEL_SHA, INITRD_SHA, "console=ttyS0 donor.mode=burn")
)
KERNEL_FILES = BootFiles(kernel=Path("/cache/sha256/k"), initrd=Path("/cache/sha256/i"))
DISK_SPEC = VmSpec("worker-7", 4, 4096, DiskBoot(DISK_SHA), network=True)
DISK_FILES = BootFiles(disk_overlay=Path("/state/guests/worker-7/disk.qcow2"))


def _check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("DONOR_UPDATE_GOLDEN"):
        path.write_text(text)
    assert text == path.read_text(), f"{name} differs from its golden file"


@pytest.mark.parametrize(
    ("golden", "spec", "files", "virt_type"),
    [
        ("kernel_qemu.xml", KERNEL_SPEC, KERNEL_FILES, "qemu"),
        ("kernel_test.xml", KERNEL_SPEC, KERNEL_FILES, "test"),
        ("disk_network_kvm.xml", DISK_SPEC, DISK_FILES, "kvm"),
    ],
)
def test_domain_xml_matches_golden_file(
    golden: str, spec: VmSpec, files: BootFiles, virt_type: str
):
    xml = build_domain_xml(
        spec,
        domain_name=f"donor-{spec.name}",
        virt_type=virt_type,
        files=files,
        console_log=Path(f"/state/guests/{spec.name}/console.log"),
    )
    _check_golden(golden, xml)


def test_isolated_network_matches_golden_file():
    _check_golden("isolated_network.xml", build_isolated_network_xml("worker-7"))


def _devices(spec: VmSpec, files: BootFiles) -> ET.Element:
    xml = build_domain_xml(
        spec, domain_name="donor-x", virt_type="qemu", files=files, console_log=Path("/c")
    )
    devices = ET.fromstring(xml).find("devices")
    assert devices is not None
    return devices


def test_the_sandbox_has_no_host_devices_graphics_or_shares():
    for spec, files in ((KERNEL_SPEC, KERNEL_FILES), (DISK_SPEC, DISK_FILES)):
        devices = _devices(spec, files)
        for tag in ("graphics", "hostdev", "filesystem", "redirdev", "smartcard", "channel"):
            assert devices.find(tag) is None, tag
        assert devices.find("video/model").get("type") == "none"  # type: ignore[union-attr]
        assert devices.find("controller[@type='usb']").get("model") == "none"  # type: ignore[union-attr]


def test_no_network_device_unless_the_spec_asks():
    assert _devices(KERNEL_SPEC, KERNEL_FILES).find("interface") is None
    interface = _devices(DISK_SPEC, DISK_FILES).find("interface")
    assert interface is not None
    assert interface.find("source").get("network") == network_name("worker-7")  # type: ignore[union-attr]


def test_each_guest_has_a_network_of_its_own_that_neither_forwards_nor_gives_the_host_an_address():
    one, other = (ET.fromstring(build_isolated_network_xml(guest)) for guest in ("a", "b"))
    assert one.findtext("name") != other.findtext("name")
    assert one.findtext("name") == network_name("a")
    for network in (one, other):
        assert network.find("forward") is None
        assert network.find("ip") is None
        # libvirt picks the first free dnrN: a bridge of its own, within IFNAMSIZ.
        bridge = network.find("bridge")
        assert bridge is not None and bridge.get("name") == "dnr%d"


@pytest.mark.parametrize("virt_type", ["kvm", "qemu", "test"])
def test_every_guest_names_one_fixed_cpu_that_can_move_between_hosts(virt_type: str):
    xml = build_domain_xml(
        KERNEL_SPEC,
        domain_name="donor-x",
        virt_type=virt_type,
        files=KERNEL_FILES,
        console_log=Path("/c"),
    )
    cpu = ET.fromstring(xml).find("cpu")
    assert cpu is not None
    # Never the host's own CPU (host-passthrough, host-model): a named model, exactly.
    assert (cpu.get("mode"), cpu.get("match")) == ("custom", "exact")
    model = cpu.find("model")
    assert model is not None and model.get("fallback") == "forbid"
    features = [(f.get("policy"), f.get("name")) for f in cpu.findall("feature")]
    if virt_type == "kvm":
        assert (model.text, cpu.get("check"), features) == ("Nehalem", "partial", [])
    else:
        # Under TCG the model with every feature QEMU gives it, so that libvirt has
        # nothing to add when the guest starts (and nothing to carry to a migration's
        # target), and refuses a QEMU that would give it anything else.
        assert (model.text, cpu.get("check")) == ("qemu64", "full")
        assert features == [("require", "hypervisor"), ("require", "lahf_lm")]


def test_the_virt_type_of_a_domain_xml_is_read_back():
    for virt_type in ("kvm", "qemu"):
        xml = build_domain_xml(
            KERNEL_SPEC,
            domain_name="donor-x",
            virt_type=virt_type,
            files=KERNEL_FILES,
            console_log=Path("/c"),
        )
        assert domain_virt_type(xml) == virt_type
    for bad in ("<domain", "<network type='qemu'/>", "<domain/>"):
        with pytest.raises(ValueError, match=r"^xml: "):
            domain_virt_type(bad)


def test_text_that_looks_like_xml_stays_text():
    # cmdline is validated to printable ASCII, which includes < and >: it must be escaped.
    spec = VmSpec("x", 1, 256, KernelBoot(KERNEL_SHA, None, "a</cmdline><devices><hostdev/>"))
    xml = build_domain_xml(
        spec,
        domain_name="donor-x",
        virt_type="qemu",
        files=BootFiles(kernel=Path("/k")),
        console_log=Path("/c"),
    )
    root = ET.fromstring(xml)
    assert root.findtext("os/cmdline") == "a</cmdline><devices><hostdev/>"
    assert root.find(".//hostdev") is None


def test_unknown_virt_type_and_unresolved_files_are_refused():
    with pytest.raises(ValueError, match="virt_type: 'xen'"):
        build_domain_xml(
            KERNEL_SPEC,
            domain_name="d",
            virt_type="xen",
            files=KERNEL_FILES,
            console_log=Path("/c"),
        )
    with pytest.raises(ValueError, match="boot.kernel_sha256"):
        build_domain_xml(
            KERNEL_SPEC,
            domain_name="d",
            virt_type="qemu",
            files=BootFiles(),
            console_log=Path("/c"),
        )
    with pytest.raises(ValueError, match="boot.disk_sha256"):
        build_domain_xml(
            DISK_SPEC,
            domain_name="d",
            virt_type="qemu",
            files=BootFiles(),
            console_log=Path("/c"),
        )
