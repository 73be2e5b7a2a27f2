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

# Devices a sandbox never gets: anything that reaches outside it or belongs to the instance alone.
_DROPPED_DEVICES = (
    "interface",
    "hostdev",
    "filesystem",
    "redirdev",
    "smartcard",
    "serial",
    "console",
    "parallel",
    "channel",
    "graphics",
    "shmem",
    "vsock",
)
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
    """A transient domain shaped like the instance (machine, firmware, CPU, memory up to a limit) with
    nothing that could let it pass for the instance or reach its networks: no NICs, no other disks.

    Its root disk is ``new_disk``, the definition the rebuild will give the instance, on the sandbox's
    own overlay: what passes here is what the instance will boot.
    """
    root_target = new_disk.find("target")
    assert root_target is not None
    xml = ET.fromstring(ET.tostring(instance))
    for tag in ("uuid", "metadata", "seclabel", "description", "title"):
        for element in xml.findall(tag):
            xml.remove(element)
    name_element = xml.find("name")
    assert name_element is not None
    name_element.text = name
    ET.SubElement(xml, "uuid").text = str(uuid.uuid4())
    ET.SubElement(xml, "description").text = description
    metadata = ET.SubElement(xml, "metadata")
    ET.SubElement(metadata, f"{{{SANDBOX_NAMESPACE}}}owner").text = owner
    for tag in ("memory", "currentMemory"):
        amount = xml.find(tag)
        if amount is not None:
            mib = _mib(amount)
            amount.set("unit", "MiB")
            amount.text = str(min(mib, max_memory_mib))
    os_element = xml.find("os")
    if os_element is not None:
        # A fresh NVRAM from the firmware's template, never the instance's own variables.
        for nvram in os_element.findall("nvram"):
            os_element.remove(nvram)
    devices = xml.find("devices")
    if devices is None:
        raise UnsupportedInstance("the instance's definition has no <devices>")
    agent = has_agent_channel(xml)
    for child in list(devices):
        if child.tag in _DROPPED_DEVICES:
            devices.remove(child)
        elif child.tag == "disk":
            target = child.find("target")
            if target is None or target.get("dev") != root_target.get("dev"):
                devices.remove(child)
            else:
                _point_at(child, new_disk, overlay)
    serial = ET.SubElement(devices, "serial", {"type": "file"})
    ET.SubElement(serial, "source", {"path": str(console)})
    ET.SubElement(serial, "target", {"port": "0"})
    if agent:
        channel = ET.SubElement(devices, "channel", {"type": "unix"})
        ET.SubElement(channel, "target", {"type": "virtio", "name": GUEST_AGENT_CHANNEL})
    if seed is not None:
        cdrom = ET.SubElement(devices, "disk", {"type": "file", "device": "cdrom"})
        ET.SubElement(cdrom, "driver", {"name": "qemu", "type": "raw"})
        ET.SubElement(cdrom, "source", {"file": str(seed)})
        os_type = xml.find("./os/type")
        machine = os_type.get("machine", "") if os_type is not None else ""
        bus, dev = ("sata", "sdz") if "q35" in machine else ("ide", "hdd")
        ET.SubElement(cdrom, "target", {"dev": dev, "bus": bus})
        ET.SubElement(cdrom, "readonly")
    on_crash = xml.find("on_crash")
    if on_crash is not None:
        on_crash.text = "destroy"
    return ET.tostring(xml, encoding="unicode")


def description_of(xml: ET.Element) -> str:
    return xml.findtext("description") or ""


def sandbox_owner(xml: ET.Element) -> str | None:
    """The owner mark a sandbox was created with, None for any other domain."""
    mark = xml.find(f"./metadata/{{{SANDBOX_NAMESPACE}}}owner")
    return None if mark is None else mark.text or ""


def _point_at(disk: ET.Element, new_disk: ET.Element, overlay: Path) -> None:
    """The sandbox's root disk: the rebuild's new disk, on the throwaway overlay."""
    disk.clear()
    disk.attrib.update(new_disk.attrib)
    # Whatever the instance's disk is (a volume, a block device, RBD), the sandbox's is a file.
    disk.set("type", "file")
    disk.extend(child for child in ET.fromstring(ET.tostring(new_disk)) if child.tag != "auth")
    source = disk.find("source")
    assert source is not None
    source.clear()
    source.set("file", str(overlay))


def _mib(element: ET.Element) -> int:
    factor = _UNITS.get(element.get("unit", "KiB").lower(), 1 / 1024)
    return max(1, int(int(element.text or "0") * factor))
