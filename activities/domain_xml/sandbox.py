"""The pre-flight sandbox's definition: the instance's, reduced to what booting its new image needs."""

from __future__ import annotations

import uuid
import xml.etree.ElementTree as ET
from pathlib import Path

from activities.domain_xml.devices import GUEST_AGENT_CHANNEL, has_agent_channel
from activities.errors import UnsupportedInstance

# A sandbox's owner mark (libvirt's per-application <metadata>): pre-flight destroys only transient
# domains that carry its own worker's mark, never a domain that merely has a sandbox's name.
SANDBOX_NAMESPACE = "https://github.com/durable-rebuild/rebuild/sandbox/1"
SANDBOX_PREFIX = "sandbox"
ET.register_namespace(SANDBOX_PREFIX, SANDBOX_NAMESPACE)

# What a sandbox takes from the instance, by allow-list: everything else (extra QEMU arguments, host
# devices, TPM, RNG and audio back ends, input from host devices, NVDIMMs, the instance's NVRAM, a host
# kernel, CPU pinning, hugepages, NUMA cells, <sysinfo>, memory DIMMs, other disks, NICs) is left out.
_FEATURES = ("acpi", "apic", "pae", "hap", "pmu", "vmport", "smm", "hyperv", "kvm")
_CPU_ATTRIBUTES = ("mode", "match", "check", "migratable")
_LOADER_ATTRIBUTES = ("readonly", "type", "secure")
_DISK_CHILDREN = ("driver", "source", "backingStore", "target")
_DRIVER_ATTRIBUTES = ("name", "type", "cache", "io", "discard", "detect_zeroes")
# A sandbox boots on few vCPUs whatever the instance has: it only has to show that the image boots.
MAX_SANDBOX_VCPUS = 4
_UNITS = {
    "b": 1 / (1 << 20),
    "bytes": 1 / (1 << 20),
    "k": 1 / 1024,
    "kib": 1 / 1024,
    "m": 1,
    "mib": 1,
    "g": 1024,
    "gib": 1024,
    "t": 1 << 20,
    "tib": 1 << 20,
}


def sandbox_definition(
    instance: ET.Element,
    name: str,
    new_disk: ET.Element,
    overlay: Path,
    console: Path,
    seed: Path | None,
    *,
    max_memory_mib: int,
    description: str,
    owner: str,
) -> str:
    """A transient domain built from an allow-list of the instance's definition: its machine type,
    firmware kind, CPU model and features, memory up to a limit, a few vCPUs; and of devices only the
    new root disk (on the sandbox's own overlay), the seed, a file serial console and the guest agent's
    channel. Nothing that could let it pass for the instance, reach the host or the instance's
    networks, or share a file with the instance (see ``_FEATURES`` and the module's notes).

    Its root disk is ``new_disk``, the definition the rebuild will give the instance: what passes
    here is what the instance will boot. An instance that boots what a sandbox cannot have (a host
    kernel, a writable firmware image) is refused with the reason.
    """
    root_target = new_disk.find("target")
    assert root_target is not None
    os_element = instance.find("os")
    os_type = os_element.find("type") if os_element is not None else None
    if os_element is not None and os_element.find("kernel") is not None:
        raise UnsupportedInstance(
            "pre-flight cannot boot an instance that boots a host kernel (<os><kernel>): the sandbox "
            "boots its image's own boot loader only"
        )
    xml = ET.Element("domain", {"type": instance.get("type", "kvm")})
    ET.SubElement(xml, "name").text = name
    ET.SubElement(xml, "uuid").text = str(uuid.uuid4())
    ET.SubElement(xml, "description").text = description
    metadata = ET.SubElement(xml, "metadata")
    ET.SubElement(metadata, f"{{{SANDBOX_NAMESPACE}}}owner").text = owner
    memory = instance.find("memory")
    mib = min(_mib(memory) if memory is not None else max_memory_mib, max_memory_mib)
    for tag in ("memory", "currentMemory"):
        ET.SubElement(xml, tag, {"unit": "MiB"}).text = str(mib)
    vcpu = instance.find("vcpu")
    vcpus = int((vcpu.text or "1").strip()) if vcpu is not None else 1
    ET.SubElement(xml, "vcpu").text = str(max(1, min(vcpus, MAX_SANDBOX_VCPUS)))
    new_os = ET.SubElement(xml, "os")
    if os_element is not None and os_element.get("firmware") in ("bios", "efi"):
        new_os.set("firmware", str(os_element.get("firmware")))
    type_attributes = {
        k: v for k, v in (os_type.attrib if os_type is not None else {}).items() if k in ("arch", "machine")
    }
    ET.SubElement(new_os, "type", type_attributes).text = "hvm"
    loader = os_element.find("loader") if os_element is not None else None
    if new_os.get("firmware") is not None:
        # Autoselected firmware: libvirt picks the loader (and a fresh NVRAM) by the wanted features.
        wanted = os_element.find("firmware") if os_element is not None else None
        if wanted is not None:
            new_os.append(_copy(wanted))
        elif loader is not None and loader.get("secure") == "yes":
            firmware = ET.SubElement(new_os, "firmware")
            ET.SubElement(firmware, "feature", {"enabled": "yes", "name": "secure-boot"})
    elif loader is not None:
        if loader.get("readonly") != "yes" and loader.get("type", "rom") == "pflash":
            raise UnsupportedInstance(
                "pre-flight cannot share the instance's writable firmware image (<loader> without "
                "readonly='yes'): give the instance a read-only loader and an NVRAM file"
            )
        copied = ET.SubElement(
            new_os, "loader", {k: v for k, v in loader.attrib.items() if k in _LOADER_ATTRIBUTES}
        )
        copied.text = loader.text
        nvram = os_element.find("nvram") if os_element is not None else None
        if nvram is not None and nvram.get("template"):
            # A fresh NVRAM from the firmware's template, never the instance's own variables.
            ET.SubElement(new_os, "nvram", {"template": str(nvram.get("template"))})
    features = instance.find("features")
    if features is not None:
        kept = ET.SubElement(xml, "features")
        kept.extend(_copy(child) for child in features if child.tag in _FEATURES)
    cpu = instance.find("cpu")
    if cpu is not None:
        new_cpu = ET.SubElement(xml, "cpu", {k: v for k, v in cpu.attrib.items() if k in _CPU_ATTRIBUTES})
        new_cpu.extend(_copy(child) for child in cpu if child.tag in ("model", "vendor", "feature"))
    clock = instance.find("clock")
    if clock is not None:
        xml.append(_copy(clock))
    for tag, action in (("on_poweroff", "destroy"), ("on_reboot", "restart"), ("on_crash", "destroy")):
        ET.SubElement(xml, tag).text = action
    devices = ET.SubElement(xml, "devices")
    root = _sandbox_disk(new_disk, overlay)
    devices.append(root)
    bus = root_target.get("bus")
    if bus == "scsi":
        for controller in instance.findall("./devices/controller[@type='scsi']"):
            model = {"model": controller.get("model", "")} if controller.get("model") else {}
            ET.SubElement(
                devices, "controller", {"type": "scsi", "index": controller.get("index", "0"), **model}
            )
    if seed is not None:
        cdrom = ET.SubElement(devices, "disk", {"type": "file", "device": "cdrom"})
        ET.SubElement(cdrom, "driver", {"name": "qemu", "type": "raw"})
        ET.SubElement(cdrom, "source", {"file": str(seed)})
        machine = type_attributes.get("machine", "")
        cdrom_bus, dev = ("sata", "sdz") if "q35" in machine else ("ide", "hdd")
        ET.SubElement(cdrom, "target", {"dev": dev, "bus": cdrom_bus})
        ET.SubElement(cdrom, "readonly")
    serial = ET.SubElement(devices, "serial", {"type": "file"})
    ET.SubElement(serial, "source", {"path": str(console)})
    ET.SubElement(serial, "target", {"port": "0"})
    if has_agent_channel(instance):
        channel = ET.SubElement(devices, "channel", {"type": "unix"})
        ET.SubElement(channel, "target", {"type": "virtio", "name": GUEST_AGENT_CHANNEL})
    ET.SubElement(devices, "memballoon", {"model": "none"})
    return ET.tostring(xml, encoding="unicode")


def _copy(element: ET.Element) -> ET.Element:
    return ET.fromstring(ET.tostring(element))


def _sandbox_disk(new_disk: ET.Element, overlay: Path) -> ET.Element:
    """The sandbox's root disk: the rebuild's new disk (its bus, format, chain) on the throwaway
    overlay, a file whatever the instance's disk is (a volume, a block device, RBD), booted first."""
    disk = ET.Element("disk", {"type": "file", "device": "disk"})
    for child in new_disk:
        if child.tag not in _DISK_CHILDREN:
            continue
        if child.tag == "driver":
            ET.SubElement(disk, "driver", {k: v for k, v in child.attrib.items() if k in _DRIVER_ATTRIBUTES})
        elif child.tag == "source":
            ET.SubElement(disk, "source", {"file": str(overlay)})
        elif child.tag == "target":
            ET.SubElement(disk, "target", {k: v for k, v in child.attrib.items() if k in ("dev", "bus")})
        else:
            disk.append(_copy(child))
    ET.SubElement(disk, "boot", {"order": "1"})
    return disk


def description_of(xml: ET.Element) -> str:
    return xml.findtext("description") or ""


def sandbox_owner(xml: ET.Element) -> str | None:
    """The owner mark a sandbox was created with, None for any other domain."""
    mark = xml.find(f"./metadata/{{{SANDBOX_NAMESPACE}}}owner")
    return None if mark is None else mark.text or ""


def _mib(element: ET.Element) -> int:
    factor = _UNITS.get(element.get("unit", "KiB").lower(), 1 / 1024)
    return max(1, int(int(element.text or "0") * factor))
