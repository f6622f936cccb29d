"""VmSpec → sandboxed libvirt domain XML, built with ElementTree (never string formatting).

The sandbox: no graphics or video, no USB or other host devices, no shared folders, no
network device unless the spec asks (and then only a network of the guest's own, isolated),
destroy on reboot/crash (a guest that misbehaves stops instead of looping), a virtio
balloon so the agent can take memory back, and the serial console written to a file.
Every guest also gets one fixed CPU definition, the same on every donor it may move to
(`_cpu`).

A guest restored from another donor's checkpoint is built here the same way, from its
spec: of the checkpoint's own definition only a few checked values come along
(`SavedGuest`), never a device, a path or an option.
"""

from __future__ import annotations

import re
import uuid
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from donor_app.domain.vm import DiskBoot, KernelBoot, VmSpec

VIRT_TYPES = ("kvm", "qemu", "test")
# Each networked guest's network is its own (two guests on one bridge could reach each
# other), named after the guest (not "donor-<guest>": an older version's network shared
# by all guests was "donor-isolated"). Its bridge is named by libvirt from this template
# (the first free number): clear of libvirt's own virbrN and well within IFNAMSIZ.
NETWORK_PREFIX = "donor-net-"
BRIDGE_TEMPLATE = "dnr%d"

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


def _cpu(domain: ET.Element, virt_type: str, saved: SavedGuest | None) -> None:
    """The guest's fixed CPU (see TCG_CPU_MODEL and KVM_CPU_MODEL)."""
    if virt_type == "kvm":
        cpu = _sub(domain, "cpu", mode="custom", match="exact", check="partial")
        _sub(cpu, "model", KVM_CPU_MODEL, fallback="forbid")
        # The features QEMU gave the model on the donor the guest was saved on: the guest
        # has seen them, so it must find them again (or libvirt refuses this host).
        for policy, name in saved.cpu_features if saved is not None else ():
            _sub(cpu, "feature", policy=policy, name=name)
        return
    cpu = _sub(domain, "cpu", mode="custom", match="exact", check="full")
    _sub(cpu, "model", TCG_CPU_MODEL, fallback="forbid")
    for feature in TCG_CPU_FEATURES:
        _sub(cpu, "feature", policy="require", name=feature)


def _devices(
    domain: ET.Element,
    spec: VmSpec,
    files: BootFiles,
    console_log: Path,
    saved: SavedGuest | None,
) -> None:
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
        if saved is not None and saved.mac is not None:
            _sub(interface, "mac", address=saved.mac)
        _sub(interface, "source", network=network_name(spec.name))
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
    saved: SavedGuest | None = None,
) -> str:
    """Return the domain XML for `spec`; raises ValueError for an unknown virt_type.

    `saved`: what a checkpoint of this guest from another host carries over (its uuid,
    machine type, MAC address and, under KVM, its CPU features); everything else comes
    from the spec, as for a guest defined here.
    """
    if virt_type not in VIRT_TYPES:
        raise ValueError(f"virt_type: {virt_type!r} is not one of {', '.join(VIRT_TYPES)}")
    domain = ET.Element("domain", type=virt_type)
    _sub(domain, "name", domain_name)
    if saved is not None:
        _sub(domain, "uuid", saved.uuid)
    _sub(domain, "memory", str(spec.memory_mib), unit="MiB")
    _sub(domain, "currentMemory", str(spec.memory_mib), unit="MiB")
    _sub(domain, "vcpu", str(spec.vcpus), placement="static")
    _os_element(domain, spec, files)
    if saved is not None:
        os_type = domain.find("os/type")
        assert os_type is not None
        os_type.set("machine", saved.machine)
    features = _sub(domain, "features")
    _sub(features, "acpi")  # lets stop() ask the guest to power off
    _cpu(domain, virt_type, saved)
    _sub(domain, "clock", offset="utc")
    for event in ("on_poweroff", "on_reboot", "on_crash"):
        _sub(domain, event, "destroy")
    pm = _sub(domain, "pm")
    _sub(pm, "suspend-to-mem", enabled="no")
    _sub(pm, "suspend-to-disk", enabled="no")
    _devices(domain, spec, files, console_log, saved)
    ET.indent(domain)
    return ET.tostring(domain, encoding="unicode") + "\n"


def network_name(guest: str) -> str:
    """The libvirt network of the guest `guest` (when its spec asks for a network)."""
    return NETWORK_PREFIX + guest


def build_isolated_network_xml(guest: str) -> str:
    """The guest's own network, for a spec that asks for one.

    One guest on one bridge: no other guest is on it. No <forward> (nothing is routed or
    NATed) and no <ip> (the host has no address on the bridge, and libvirt turns IPv6 off
    on a bridge with no IPv6 address, so not even a link-local one): the guest reaches
    neither the host, nor the LAN, nor another guest through it.
    """
    network = ET.Element("network")
    _sub(network, "name", network_name(guest))
    _sub(network, "bridge", name=BRIDGE_TEMPLATE, stp="on", delay="0")
    ET.indent(network)
    return ET.tostring(network, encoding="unicode") + "\n"


# --- what a checkpoint from another host may carry over -------------------------------------

# A machine type names a version of QEMU's emulated board: the guest's saved state is of
# that board, and QEMU refuses to load it into another. Only the boards donor_app's guests
# get by default (libvirt's default for the architecture), in a version.
MACHINE_PATTERNS = {
    "x86_64": re.compile(r"^pc-(i440fx|q35)-\d{1,3}\.\d{1,3}$"),
    "aarch64": re.compile(r"^virt-\d{1,3}\.\d{1,3}$"),
}
# A unicast MAC address (the low bit of the first octet clear).
MAC_PATTERN = re.compile(r"^[0-9a-f][02468ace](:[0-9a-f]{2}){5}$")
CPU_FEATURE_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
CPU_FEATURE_POLICIES = ("require", "disable")
MAX_CPU_FEATURES = 256


@dataclass(frozen=True, slots=True)
class SavedGuest:
    """The few values of a checkpoint's own definition that a restore here keeps, each
    checked: what the saved state needs to be loaded again and cannot harm this host.

    `uuid`: the guest's identity (its firmware shows it to the guest). `machine`: the
    emulated board the state was saved from. `mac`: the guest's network card's address,
    None without one. `cpu_features`: under KVM, the features QEMU gave the CPU model on
    the donor it was saved on ((policy, name) pairs); empty otherwise.
    """

    uuid: str
    machine: str
    mac: str | None = None
    cpu_features: tuple[tuple[str, str], ...] = ()


def _parse(text: str, field: str, root: str) -> ET.Element:
    try:
        element = ET.fromstring(text)
    except ET.ParseError as exc:
        raise ValueError(f"{field}: not well-formed XML ({exc})") from exc
    if element.tag != root:
        raise ValueError(f"{field}: the root element is <{element.tag}>, not <{root}>")
    return element


def _checked_uuid(value: str | None) -> str:
    try:
        parsed = uuid.UUID(value or "")
    except ValueError:
        raise ValueError(f"uuid: {value!r} is not a UUID") from None
    if str(parsed) != (value or "").strip().lower() or parsed.int == 0:
        raise ValueError(f"uuid: {value!r} is not a UUID in its usual form")
    return str(parsed)


def _checked_mac(domain: ET.Element, network: bool) -> str | None:
    if not network:
        return None  # the guest gets no network card: its saved address means nothing here
    interfaces = domain.findall("devices/interface")
    addresses = [mac.get("address") for mac in domain.findall("devices/interface/mac")]
    if len(interfaces) != 1 or len(addresses) != 1:
        return None  # libvirt gives the card an address; QEMU decides if the state loads
    address = (addresses[0] or "").lower()
    if not MAC_PATTERN.fullmatch(address):
        raise ValueError(f"devices.interface.mac: {addresses[0]!r} is not a unicast MAC address")
    return address


def _checked_cpu_features(cookie: str | None) -> tuple[tuple[str, str], ...]:
    """The KVM CPU features of a save image's cookie (libvirt's record of the CPU QEMU ran)."""
    if not cookie:
        return ()
    cpu = _parse(cookie, "cookie", "cookie").find("cpu")
    if cpu is None:
        return ()
    if cpu.get("mode", "custom") != "custom" or cpu.findtext("model") != KVM_CPU_MODEL:
        raise ValueError(
            f"cookie.cpu: the guest's CPU is the model {KVM_CPU_MODEL}, not"
            f" {cpu.get('mode')!r} {cpu.findtext('model')!r}"
        )
    features = []
    for feature in cpu.findall("feature"):
        policy, name = feature.get("policy", ""), feature.get("name", "")
        if policy not in CPU_FEATURE_POLICIES or not CPU_FEATURE_PATTERN.fullmatch(name):
            raise ValueError(f"cookie.cpu.feature: {policy!r} {name!r} is not allowed")
        features.append((policy, name))
    if len(features) > MAX_CPU_FEATURES:
        raise ValueError(f"cookie.cpu: {len(features)} features, at most {MAX_CPU_FEATURES}")
    return tuple(features)


def saved_guest(
    xml: str, cookie: str | None, *, spec: VmSpec, domain_name: str, virt_type: str
) -> SavedGuest:
    """What a checkpoint's definition `xml` (and libvirt's `cookie` beside it in a save
    image) may carry into this host's definition of the guest `spec`.

    Everything else in it (devices, paths, options, security labels, the emulator) is
    never read. ValueError names the field that does not fit: a checkpoint of another
    guest, of another kind of guest (virt type, architecture), or a value out of bounds.
    """
    domain = _parse(xml, "xml", "domain")
    name = domain.findtext("name")
    if name != domain_name:
        raise ValueError(f"name: the domain XML is for {name!r}, not {domain_name!r}")
    if domain.get("type") != virt_type:
        raise ValueError(
            f"type: a checkpoint of a {domain.get('type')!r} guest, this host runs {virt_type!r}"
        )
    os_type = domain.find("os/type")
    arch = os_type.get("arch") if os_type is not None else None
    if arch != spec.arch:
        raise ValueError(f"os.type.arch: {arch!r}, the spec says {spec.arch!r}")
    machine = os_type.get("machine", "") if os_type is not None else ""
    if not MACHINE_PATTERNS[spec.arch].fullmatch(machine):
        raise ValueError(f"os.type.machine: {machine!r} is not a machine type guests get")
    return SavedGuest(
        uuid=_checked_uuid(domain.findtext("uuid")),
        machine=machine,
        mac=_checked_mac(domain, spec.network),
        cpu_features=_checked_cpu_features(cookie) if virt_type == "kvm" else (),
    )


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
    """Rewrite a live migration's domain XML (the source's migratable XML) for the target.

    The source drives a live migration and so must be trusted with the target's libvirt
    anyway (docs/migration.md: only between daemons one administrator controls); a
    checkpoint's definition is never rewritten but rebuilt (`saved_guest`). Only
    host-local paths change: kernel, initrd, the console file (and a chardev <log>),
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
