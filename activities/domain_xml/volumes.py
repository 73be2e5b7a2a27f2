"""Storage volumes' XML: a new volume's definition, what an existing one says, and a root disk's
definition pointed at another volume (or another RBD image)."""

from __future__ import annotations

import xml.etree.ElementTree as ET

from activities.domain_xml.disks import without_chain


def volume_definition(
    name: str, capacity: int, fmt: str | None, backing: tuple[str, str] | None = None
) -> str:
    """A volume of ``capacity`` bytes in ``fmt`` (None: a block pool's, which names none); with
    ``backing`` (path, format), an overlay on it."""
    volume = ET.Element("volume")
    ET.SubElement(volume, "name").text = name
    ET.SubElement(volume, "capacity", {"unit": "bytes"}).text = str(capacity)
    target = ET.SubElement(volume, "target")
    if fmt is not None:
        ET.SubElement(target, "format", {"type": fmt})
    if backing is not None:
        store = ET.SubElement(volume, "backingStore")
        ET.SubElement(store, "path").text = backing[0]
        ET.SubElement(store, "format", {"type": backing[1]})
    return ET.tostring(volume, encoding="unicode")


def volume_format(volume: ET.Element) -> str:
    found = volume.find("./target/format")
    return found.get("type", "raw") if found is not None else "raw"


def volume_backing(volume: ET.Element) -> str | None:
    return volume.findtext("./backingStore/path")


def pointed_at(disk: ET.Element, source: dict[str, str], fmt: str) -> ET.Element:
    """The root disk's definition with its source replaced by ``source`` (``pool``/``volume``, or
    ``dev``), in ``fmt``; the old volume's chain goes, libvirt reads the new one's."""
    copy = without_chain(disk, fmt)
    old = copy.find("source")
    keep = [child for child in old if child.tag == "seclabel"] if old is not None else []
    new = ET.Element("source", source)
    new.extend(keep)
    if old is not None:
        copy.insert(list(copy).index(old), new)
        copy.remove(old)
    else:
        copy.insert(1, new)
    return copy


def rbd_pointed_at(disk: ET.Element, name: str) -> ET.Element:
    """The RBD disk's definition with its source naming the image ``name`` (POOL/IMAGE): monitors,
    auth, driver and the rest kept; a running domain's chain and block job target dropped."""
    copy = ET.fromstring(ET.tostring(disk))
    source = copy.find("source")
    assert source is not None
    source.set("name", name)
    source.attrib.pop("index", None)
    for tag in ("backingStore", "mirror"):
        for element in copy.findall(tag):
            copy.remove(element)
    return copy
