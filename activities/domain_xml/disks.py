"""Which disk is the root disk, and what its new definition is.

The rules follow libvirt's own (its domain XML format, and libvirt 9.0's ``effectiveBootIndex``): a
shape that a rebuild cannot handle correctly is refused here, with the reason, before anything on the
host changes.
"""

from __future__ import annotations

import io
import xml.etree.ElementTree as ET
from dataclasses import dataclass

from activities.domain_xml.devices import SEED_ALIAS
from activities.errors import UnsupportedInstance

DISK_FORMATS = ("raw", "qcow2")
# The kinds of root disk (the <disk type>) a back end in activities/root_disks may replace.
KINDS = ("file", "block", "volume", "network")
# <os><boot dev=...> names, and the device each stands for (libvirt gives the index to the first one).
_LEGACY_BOOT_DEVICES = {"hd": "disk", "cdrom": "cdrom", "fd": "floppy", "network": "interface"}


@dataclass(frozen=True)
class RootDisk:
    """The disk a rebuild replaces, as the definition names it.

    ``path`` is where its kind says it is: a file (maybe a symlink) or a block device, ``pool/volume``
    for a storage-pool volume, ``rbd:pool/image`` for a network disk.
    """

    path: str
    format: str
    target: str
    kind: str = "file"


def parse(text: str) -> ET.Element:
    """Parse domain XML, keeping the namespace prefixes other tools' ``<metadata>`` uses.

    ElementTree renames unknown prefixes ``ns0``, ``ns1``... when it writes a tree back; a redefine
    would then change every other tool's metadata element. Registering the prefixes the document
    declares keeps them (the registry is process-wide, and a prefix always maps to the same URI in
    libvirt's output of one tool).
    """
    for _event, (prefix, uri) in ET.iterparse(io.StringIO(text), events=("start-ns",)):
        if prefix and not prefix.startswith("ns"):
            ET.register_namespace(prefix, uri)
    return ET.fromstring(text)


def to_string(xml: ET.Element) -> str:
    return ET.tostring(xml, encoding="unicode")


def _target(element: ET.Element) -> str | None:
    target = element.find("target")
    return target.get("dev") if target is not None else None


def _describe(element: ET.Element) -> str:
    if element.tag == "disk":
        return f"{element.get('device', 'disk')} {_target(element) or '?'}"
    if element.tag == "interface":
        mac = element.find("mac")
        return f"NIC {mac.get('address') if mac is not None else '?'}"
    return element.tag


def _has_media(disk: ET.Element) -> bool:
    source = disk.find("source")
    return source is not None and any(source.get(a) for a in ("file", "dev", "name", "volume", "dir"))


def _is_seed(disk: ET.Element) -> bool:
    """The cloud-init seed CD-ROM a rebuild attaches: never a boot candidate."""
    alias = disk.find("alias")
    return alias is not None and alias.get("name") == SEED_ALIAS


def boot_sequence(xml: ET.Element) -> list[ET.Element]:
    """The devices the firmware tries, in order, as libvirt tells QEMU (``bootindex``).

    Per-device ``<boot order>`` wins; libvirt refuses a definition that mixes it with ``<os><boot>``.
    Otherwise each ``<os><boot dev>`` stands for the first device of its kind (``hd``: the first disk
    with ``device='disk'`` in the definition), and a definition with neither boots ``hd``.
    """
    devices = xml.find("devices")
    if devices is None:
        return []
    ordered: list[tuple[int, ET.Element]] = []
    for element in devices:
        boot = element.find("boot")
        if boot is not None and boot.get("order", "").isdigit():
            ordered.append((int(boot.get("order", "0")), element))
    if ordered:
        return [element for _, element in sorted(ordered, key=lambda pair: pair[0])]
    names = [b.get("dev", "") for b in xml.findall("./os/boot")] or ["hd"]
    sequence: list[ET.Element] = []
    for name in names:
        kind = _LEGACY_BOOT_DEVICES.get(name)
        if kind == "interface":
            first = devices.find("interface")
        else:
            first = next((d for d in devices.findall("disk") if d.get("device", "disk") == kind), None)
        if first is not None and first not in sequence:
            sequence.append(first)
    return sequence


def _by_target(xml: ET.Element, target: str, instance: str) -> ET.Element:
    for disk in xml.findall("./devices/disk"):
        if _target(disk) == target:
            if disk.get("device", "disk") != "disk":
                raise UnsupportedInstance(
                    f"instance {instance!r}: {target} is a {disk.get('device')}, not a disk to rebuild"
                )
            return disk
    known = ", ".join(t for d in xml.findall("./devices/disk") if (t := _target(d))) or "none"
    raise UnsupportedInstance(f"instance {instance!r} has no disk {target!r} (its disks: {known})")


def root_disk_element(xml: ET.Element, instance: str, target: str | None = None) -> ET.Element:
    """The ``<disk>`` a rebuild replaces: the operator's ``target``, else the first disk in boot order.

    Where the boot order does not make that certain, refuse and let the operator name it: a CD-ROM
    with media, a passed-through device or a kernel from the host comes before any disk, or nothing
    bootable is a disk. NICs are passed over (a network boot that finds no server falls through).
    """
    if target is not None:
        return _by_target(xml, target, instance)
    choose = "; name the root disk with --root-disk TARGET"
    if xml.findtext("./os/kernel"):
        raise UnsupportedInstance(
            f"instance {instance!r} boots a kernel from the host (<os><kernel>), not from a disk{choose}"
        )
    for element in boot_sequence(xml):
        if element.tag == "interface":
            continue
        if element.tag == "disk":
            device = element.get("device", "disk")
            if device == "disk":
                return element
            if _is_seed(element) or not _has_media(element):
                continue
        raise UnsupportedInstance(
            f"instance {instance!r} boots from {_describe(element)} before any disk, so its root disk "
            f"is not certain{choose}"
        )
    raise UnsupportedInstance(f"instance {instance!r} boots from no disk{choose}")


def _refuse_shape(disk: ET.Element, instance: str) -> None:
    """Disk shapes a file overlay cannot replace faithfully, each with its reason."""
    target = _target(disk) or "?"
    where = f"instance {instance!r}: root disk {target}"
    kind = disk.get("type", "file")
    if kind not in KINDS:
        raise UnsupportedInstance(
            f"{where} is of type {kind!r}; root disks of type {', '.join(KINDS)} can be rebuilt"
        )
    source = disk.find("source")
    if source is None or not _where(disk):
        raise UnsupportedInstance(f"{where} has no source")
    if kind == "network" and source.get("protocol") != "rbd":
        raise UnsupportedInstance(
            f"{where} is a network disk over {source.get('protocol')!r}; only RBD network disks can be "
            "rebuilt"
        )
    if disk.find("encryption") is not None or source.find("encryption") is not None:
        raise UnsupportedInstance(
            f"{where} is encrypted (<encryption>); a new disk would not be, so it is not rebuilt"
        )
    if disk.find("shareable") is not None:
        raise UnsupportedInstance(
            f"{where} is shareable (<shareable/>): other domains may use it, and a qcow2 overlay "
            "cannot be shared"
        )
    if disk.find("readonly") is not None:
        raise UnsupportedInstance(f"{where} is read-only (<readonly/>)")
    if disk.find("transient") is not None:
        raise UnsupportedInstance(f"{where} is transient (<transient/>)")
    driver = disk.find("driver")
    fmt = driver.get("type", "raw") if driver is not None else "raw"
    if fmt not in DISK_FORMATS:
        raise UnsupportedInstance(f"{where} is {fmt}; only raw and qcow2 root disks can be rebuilt")
    if target == "?":
        raise UnsupportedInstance(f"instance {instance!r}: root disk has no target device")


def _where(disk: ET.Element) -> str | None:
    source = disk.find("source")
    if source is None:
        return None
    kind = disk.get("type", "file")
    if kind == "volume":
        pool, volume = source.get("pool"), source.get("volume")
        return f"{pool}/{volume}" if pool and volume else None
    if kind == "network":
        name = source.get("name")
        return f"{source.get('protocol')}:{name}" if name else None
    return source.get("dev" if kind == "block" else "file")


def root_disk(xml: ET.Element, instance: str, target: str | None = None) -> RootDisk:
    """The root disk, refused here when its shape cannot be rebuilt (see ``_refuse_shape``); a root-disk
    back end refuses more of its own kind."""
    disk = root_disk_element(xml, instance, target)
    _refuse_shape(disk, instance)
    driver = disk.find("driver")
    return RootDisk(
        path=str(_where(disk)),
        format=driver.get("type", "raw") if driver is not None else "raw",
        target=str(_target(disk)),
        kind=disk.get("type", "file"),
    )


def step_root_disk(xml: ET.Element, instance: str, target: str | None) -> RootDisk:
    """The root disk as a step after inspect finds it: by the target inspect found.

    A rebuild started before inspect passed its target on found its root disk by the rule of its
    time (boot order 1 among disks, else the first disk): its later steps keep to that rule.
    """
    if target is None:
        disks = [d for d in xml.findall("./devices/disk") if d.get("device", "disk") == "disk"]
        first = [d for d in disks if d.find("boot[@order='1']") is not None] or disks
        target = _target(first[0]) if first else None
    return root_disk(xml, instance, target)


def disk_element(xml: ET.Element, target: str) -> ET.Element:
    for disk in xml.findall("./devices/disk"):
        if _target(disk) == target:
            return disk
    raise UnsupportedInstance(f"root disk {target!r} vanished from the definition")


# What of the old <source> the new disk keeps: its own attributes, and its per-disk security labels.
_SOURCE_KEEPS = ("seclabel",)
# What of the old <disk> a new file disk drops: the old file's chain, a block job's target, the old
# file's slices and its data store are properties of the old file, not of the instance.
_DISK_DROPS = ("backingStore", "mirror")


def rebuilt_disk(old: ET.Element, base: str, base_format: str) -> ET.Element:
    """The root disk's new definition: the same device (target, bus, address, boot order, serial,
    tuning), its source a qcow2 overlay at the same path, the backing chain spelled out.

    Spelling the chain out matters: a definition copied from ``virsh dumpxml`` of a running domain
    carries the old disk's ``<backingStore>``, and libvirt uses a written chain as it is instead of
    reading the new file's header (the guest would boot the old base, or an empty disk).
    """
    return _new_file_disk(old, "qcow2", (base, base_format))


def standalone_disk(old: ET.Element, fmt: str) -> ET.Element:
    """The root disk's new definition for a standalone file at the same path (a copy of the image):
    the same device in ``fmt``, with an empty ``<backingStore/>`` that says it has no chain (for the
    same reason as ``rebuilt_disk``)."""
    return _new_file_disk(old, fmt, None)


def _new_file_disk(old: ET.Element, fmt: str, base: tuple[str, str] | None) -> ET.Element:
    disk = without_chain(old, fmt)
    source = disk.find("source")
    assert source is not None
    source.attrib.pop("index", None)
    for child in list(source):
        if child.tag not in _SOURCE_KEEPS:
            source.remove(child)
    backing = ET.Element("backingStore")
    if base is not None:
        backing.set("type", "file")
        ET.SubElement(backing, "format", {"type": base[1]})
        ET.SubElement(backing, "source", {"file": base[0]})
        ET.SubElement(backing, "backingStore")
    disk.insert(list(disk).index(source) + 1, backing)
    return disk


def without_chain(old: ET.Element, fmt: str) -> ET.Element:
    """A copy of the disk in ``fmt`` with nothing of the old file's chain (nor a block job's target)."""
    disk = ET.fromstring(ET.tostring(old))
    for tag in _DISK_DROPS:
        for element in disk.findall(tag):
            disk.remove(element)
    driver = disk.find("driver")
    if driver is None:
        driver = ET.Element("driver", {"name": "qemu"})
        disk.insert(0, driver)
    driver.set("type", fmt)
    return disk


def with_format(disk: ET.Element, fmt: str) -> ET.Element:
    """A copy of ``disk`` whose driver says ``fmt``."""
    copy = ET.fromstring(ET.tostring(disk))
    driver = copy.find("driver")
    if driver is None:
        driver = ET.SubElement(copy, "driver", {"name": "qemu"})
    driver.set("type", fmt)
    return copy


def same(first: ET.Element, second: ET.Element) -> bool:
    """The same element, whatever the whitespace between its children."""
    return bool(
        ET.canonicalize(ET.tostring(first), strip_text=True)
        == ET.canonicalize(ET.tostring(second), strip_text=True)
    )


def with_disk(xml: ET.Element, disk: ET.Element) -> ET.Element:
    """A copy of the definition with the disk of the same target replaced by ``disk``."""
    copy = ET.fromstring(ET.tostring(xml))
    devices = copy.find("devices")
    assert devices is not None
    target = _target(disk)
    for index, element in enumerate(list(devices)):
        if element.tag == "disk" and _target(element) == target:
            devices.remove(element)
            devices.insert(index, ET.fromstring(ET.tostring(disk)))
            return copy
    raise UnsupportedInstance(f"root disk {target!r} vanished from the definition")


def chain(disk: ET.Element) -> list[tuple[str | None, str | None]]:
    """(where, format) of the disk and each ``<backingStore>`` below it, as written: a file or a
    block device by its path, a pool volume as ``volume:POOL/NAME``."""
    source = disk.find("source")
    driver = disk.find("driver")
    where = None
    if source is not None:
        if disk.get("type") == "volume":
            where = f"volume:{source.get('pool')}/{source.get('volume')}"
        else:
            where = source.get("file") or source.get("dev")
    links: list[tuple[str | None, str | None]] = [(where, driver.get("type") if driver is not None else None)]
    store = disk.find("backingStore")
    while store is not None and store.find("source") is not None:
        fmt = store.find("format")
        src = store.find("source")
        assert src is not None
        links.append((src.get("file") or src.get("dev"), fmt.get("type") if fmt is not None else None))
        store = store.find("backingStore")
    return links


def disk_files(xml: ET.Element) -> list[tuple[str, str | None]]:
    """Every file a definition's disks name, with the format where it says it: sources and chains."""
    files: list[tuple[str, str | None]] = []
    for disk in xml.findall("./devices/disk"):
        files.extend((path, fmt) for path, fmt in chain(disk) if path)
    return files
