"""VmSpec → sandboxed libvirt domain XML, built with ElementTree (never string formatting).

The sandbox: no graphics or video, no USB or other host devices, no shared folders, no
network device unless the spec asks (and then only the isolated network), destroy on
reboot/crash (a guest that misbehaves stops instead of looping), a virtio balloon so the
agent can take memory back, and the serial console written to a file. Every guest also
gets one fixed CPU definition, the same on every donor it may move to (`_cpu`).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from donor_app.domain.vm import DiskBoot, KernelBoot, VmSpec

VIRT_TYPES = ("kvm", "qemu", "test")
ISOLATED_NETWORK = "donor-isolated"
# libvirt's default bridge names are virbrN; ours stays clear of them and fits IFNAMSIZ.
ISOLATED_BRIDGE = "virbr-donor"

# The guest's CPU. Without a <cpu> element libvirt picks the machine type's default model
# (qemu64) and, once QEMU runs, adds to the running definition the features QEMU turned
# on beyond libvirt's own description of that model: under TCG, `hypervisor` and
# `lahf_lm`. A live migration carries that expanded CPU to the target, so the target's
# QEMU started with `-cpu qemu64,hypervisor=on,lahf-lm=on` where the source's had
# `-cpu qemu64`: one guest, two CPU definitions, equal only while both hosts' QEMU expand
# qemu64 alike. So the definition names everything itself.
#
# TCG: QEMU emulates the CPU, so it is the same on every host: the model with exactly
# the features QEMU gives it, and check='full' so that libvirt refuses to start (or take
# in) the guest if QEMU would give it anything else ("guest CPU doesn't match
# specification") instead of quietly starting another CPU.
TCG_CPU_MODEL = "qemu64"
TCG_CPU_FEATURES = ("hypervisor", "lahf_lm")
# KVM: host-passthrough would hand the guest the workstation's own CPU, and a guest
# that has seen one workstation's CPU cannot move to a machine with an older or another
# CPU (libvirt refuses the migration, or the guest faults on an instruction it was told
# it had). A named baseline model that every x86-64 workstation of the last fifteen years
# provides can move between any two of them: Nehalem (SSE4.2, POPCNT: about the
# x86-64-v2 level that current distributions require). fallback='forbid' with
# check='partial' makes libvirt refuse a host that lacks one of its features rather than
# start a smaller CPU. Its exact features under KVM also depend on the host kernel (QEMU
# adds x2apic, hypervisor and others), so they are not pinned as for TCG: libvirt
# records what QEMU started and sends it along with a live migration, and the target
# must start exactly that or refuse the migration.
KVM_CPU_MODEL = "Nehalem"


@dataclass(frozen=True, slots=True)
class BootFiles:
    """Host paths of what the spec boots, resolved (and verified) by the image cache."""

    kernel: Path | None = None
    initrd: Path | None = None
    disk_overlay: Path | None = None


def _sub(parent: ET.Element, tag: str, text: str | None = None, **attrs: str) -> ET.Element:
    element = ET.SubElement(parent, tag, attrs)
    if text is not None:
        element.text = text
    return element


def _os_element(domain: ET.Element, spec: VmSpec, files: BootFiles) -> None:
    os_el = _sub(domain, "os")
    _sub(os_el, "type", "hvm", arch=spec.arch)
    if isinstance(spec.boot, KernelBoot):
        if files.kernel is None:
            raise ValueError("boot.kernel_sha256: no kernel file was resolved for this spec")
        _sub(os_el, "kernel", str(files.kernel))
        if spec.boot.initrd_sha256 is not None:
            if files.initrd is None:
                raise ValueError("boot.initrd_sha256: no initrd file was resolved for this spec")
            _sub(os_el, "initrd", str(files.initrd))
        _sub(os_el, "cmdline", spec.boot.cmdline)
    else:
        _sub(os_el, "boot", dev="hd")


def _cpu(domain: ET.Element, virt_type: str) -> None:
    """The guest's fixed CPU (see TCG_CPU_MODEL and KVM_CPU_MODEL)."""
    if virt_type == "kvm":
        cpu = _sub(domain, "cpu", mode="custom", match="exact", check="partial")
        _sub(cpu, "model", KVM_CPU_MODEL, fallback="forbid")
        return
    cpu = _sub(domain, "cpu", mode="custom", match="exact", check="full")
    _sub(cpu, "model", TCG_CPU_MODEL, fallback="forbid")
    for feature in TCG_CPU_FEATURES:
        _sub(cpu, "feature", policy="require", name=feature)


def _devices(domain: ET.Element, spec: VmSpec, files: BootFiles, console_log: Path) -> None:
    devices = _sub(domain, "devices")
    # libvirt adds a USB controller (and tablet) by default: say there is none.
    _sub(devices, "controller", type="usb", model="none")
    if isinstance(spec.boot, DiskBoot):
        if files.disk_overlay is None:
            raise ValueError("boot.disk_sha256: no disk overlay was prepared for this spec")
        disk = _sub(devices, "disk", type="file", device="disk")
        _sub(disk, "driver", name="qemu", type="qcow2")
        _sub(disk, "source", file=str(files.disk_overlay))
        _sub(disk, "target", dev="vda", bus="virtio")
    if spec.network:
        interface = _sub(devices, "interface", type="network")
        _sub(interface, "source", network=ISOLATED_NETWORK)
        _sub(interface, "model", type="virtio")
    serial = _sub(devices, "serial", type="file")
    _sub(serial, "source", path=str(console_log), append="on")
    _sub(serial, "target", port="0")
    video = _sub(devices, "video")
    _sub(video, "model", type="none")
    balloon = _sub(devices, "memballoon", model="virtio")
    # Stats every second let the agent see the balloon reach its target.
    _sub(balloon, "stats", period="1")


def build_domain_xml(
    spec: VmSpec,
    *,
    domain_name: str,
    virt_type: str,
    files: BootFiles,
    console_log: Path,
) -> str:
    """Return the domain XML for `spec`; raises ValueError for an unknown virt_type."""
    if virt_type not in VIRT_TYPES:
        raise ValueError(f"virt_type: {virt_type!r} is not one of {', '.join(VIRT_TYPES)}")
    domain = ET.Element("domain", type=virt_type)
    _sub(domain, "name", domain_name)
    _sub(domain, "memory", str(spec.memory_mib), unit="MiB")
    _sub(domain, "currentMemory", str(spec.memory_mib), unit="MiB")
    _sub(domain, "vcpu", str(spec.vcpus), placement="static")
    _os_element(domain, spec, files)
    features = _sub(domain, "features")
    _sub(features, "acpi")  # lets stop() ask the guest to power off
    _cpu(domain, virt_type)
    _sub(domain, "clock", offset="utc")
    for event in ("on_poweroff", "on_reboot", "on_crash"):
        _sub(domain, event, "destroy")
    pm = _sub(domain, "pm")
    _sub(pm, "suspend-to-mem", enabled="no")
    _sub(pm, "suspend-to-disk", enabled="no")
    _devices(domain, spec, files, console_log)
    ET.indent(domain)
    return ET.tostring(domain, encoding="unicode") + "\n"


def build_isolated_network_xml() -> str:
    """The network a guest gets when its spec asks for one.

    No <forward> (nothing is routed or NATed) and no <ip> (the host has no address on the
    bridge, so guests can reach neither the host nor each other's services through it).
    """
    network = ET.Element("network")
    _sub(network, "name", ISOLATED_NETWORK)
    _sub(network, "bridge", name=ISOLATED_BRIDGE, stp="on", delay="0")
    ET.indent(network)
    return ET.tostring(network, encoding="unicode") + "\n"


def domain_virt_type(xml: str) -> str:
    """The type of a domain XML's <domain> ("kvm", "qemu", ...); ValueError if none."""
    try:
        domain = ET.fromstring(xml)
    except ET.ParseError as exc:
        raise ValueError(f"xml: not a well-formed domain XML ({exc})") from exc
    virt_type = domain.get("type")
    if domain.tag != "domain" or virt_type is None:
        raise ValueError("xml: no <domain type=...> at the root")
    return virt_type


def _set_text(os_el: ET.Element | None, tag: str, path: Path | None) -> None:
    element = os_el.find(tag) if os_el is not None else None
    if element is None:
        if path is not None:
            raise ValueError(f"files.{tag}: given, but the domain XML boots no <{tag}>")
        return
    if path is None:
        raise ValueError(f"files.{tag}: the domain XML boots a <{tag}> but none was given")
    element.text = str(path)


def _retarget_console(devices: ET.Element, console_log: Path) -> None:
    # <console> repeats the serial port's source: both must name this host's file.
    for chardev in (*devices.findall("serial"), *devices.findall("console")):
        if chardev.get("type") == "file":
            source = chardev.find("source")
            if source is not None and source.get("path") is not None:
                source.set("path", str(console_log))
        log_el = chardev.find("log")
        if log_el is not None and log_el.get("file") is not None:
            # Same file name, in this host's directory for the guest's console.
            log_el.set("file", str(console_log.parent / Path(log_el.get("file", "")).name))


def _retarget_disk(devices: ET.Element, overlay: Path | None) -> None:
    sources = [
        source
        for disk in devices.findall("disk")
        if disk.get("device", "disk") == "disk"
        for source in disk.findall("source")
        if source.get("file") is not None
    ]
    if overlay is None:
        if sources:
            raise ValueError("files.disk_overlay: the domain XML has a disk but none was given")
        return
    if len(sources) != 1:
        raise ValueError(
            f"files.disk_overlay: the domain XML has {len(sources)} file disks, expected 1"
        )
    sources[0].set("file", str(overlay))


def retarget_domain_xml(xml: str, *, domain_name: str, files: BootFiles, console_log: Path) -> str:
    """Rewrite another host's domain XML (migratable, or from a save image) for this host.

    Only host-local paths change: kernel, initrd, the console file (and a chardev <log>),
    the disk overlay. Name, uuid, devices and their addresses stay as they are, since
    libvirt checks the guest ABI is unchanged. ValueError names the field that does not
    fit (a domain of another name, a kernel given for a domain that boots none, …).
    """
    # Elements in other namespaces (<qemu:commandline>, <metadata>) come back with
    # ElementTree's own prefixes (ns0:…): libvirt matches them by namespace URI, not prefix.
    try:
        domain = ET.fromstring(xml)
    except ET.ParseError as exc:
        raise ValueError(f"xml: not a well-formed domain XML ({exc})") from exc
    if domain.tag != "domain":
        raise ValueError(f"xml: the root element is <{domain.tag}>, not <domain>")
    name = domain.findtext("name")
    if name != domain_name:
        raise ValueError(f"name: the domain XML is for {name!r}, not {domain_name!r}")
    os_el = domain.find("os")
    _set_text(os_el, "kernel", files.kernel)
    _set_text(os_el, "initrd", files.initrd)
    devices = domain.find("devices")
    if devices is not None:
        _retarget_console(devices, console_log)
        _retarget_disk(devices, files.disk_overlay)
    elif files.disk_overlay is not None:
        raise ValueError("files.disk_overlay: given, but the domain XML has no devices")
    return ET.tostring(domain, encoding="unicode") + "\n"
