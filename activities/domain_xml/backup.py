"""The ``<domainbackup>`` document of a snapshot: the root disk pushed into one file, no other disk."""

from __future__ import annotations

import xml.etree.ElementTree as ET

from activities.domain_xml.disks import parse, to_string


def backup_definition(root_target: str, target_file: str, disk_format: str, every_disk: list[str]) -> str:
    """Push mode: libvirt backs up every disk it is not told to leave out, so each other disk is."""
    backup = ET.Element("domainbackup", mode="push")
    disks = ET.SubElement(backup, "disks")
    for name in every_disk:
        if name != root_target:
            ET.SubElement(disks, "disk", name=name, backup="no")
    disk = ET.SubElement(disks, "disk", name=root_target, backup="yes", type="file")
    ET.SubElement(disk, "target", file=target_file)
    ET.SubElement(disk, "driver", type=disk_format)
    return to_string(backup)


def backup_target(definition: str) -> str | None:
    """The file a running backup job writes its (one) backed-up disk into."""
    for disk in parse(definition).iterfind("disks/disk"):
        if disk.get("backup") == "yes":
            target = disk.find("target")
            return target.get("file") if target is not None else None
    return None


def disk_targets(xml: ET.Element) -> list[str]:
    """Every disk's target device, CD-ROMs and floppies too."""
    targets = (disk.find("target") for disk in xml.iterfind("devices/disk"))
    return [dev for target in targets if target is not None and (dev := target.get("dev"))]
