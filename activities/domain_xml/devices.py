"""The devices and records a rebuild reads in a definition besides the root disk: consoles, the guest
agent's channel, the cloud-init seed CD-ROM with the identity recorded beside it, checkpoints."""

from __future__ import annotations

import hashlib
import xml.etree.ElementTree as ET
from dataclasses import dataclass

from activities.errors import UnsupportedInstance
from workflows.identity import GuestIdentity

GUEST_AGENT_CHANNEL = "org.qemu.guest_agent.0"
# Where a rebuild records the image an instance runs (libvirt's per-application <metadata>).
IMAGE_NAMESPACE = "https://github.com/durable-rebuild/rebuild/1"
IMAGE_PREFIX = "rebuild"
# Where the guest's identity is recorded; its seed CD-ROM carries this user alias.
IDENTITY_NAMESPACE = "https://durable-rebuild.dev/xmlns/identity/1"
SEED_ALIAS = "ua-rebuild-seed"
_IDE_TARGETS = ("hda", "hdb", "hdc", "hdd")
_SATA_TARGETS = tuple(f"sd{chr(ord('a') + n)}" for n in range(26))


@dataclass(frozen=True)
class SerialLog:
    path: str
    # With append='off' (the default) libvirt empties the file at each start.
    appends: bool


def serial_log(xml: ET.Element) -> SerialLog | None:
    """The file a ``<serial type='file'>`` (or console) writes to, where the boot check reads."""
    for kind in ("serial", "console"):
        for dev in xml.findall(f"./devices/{kind}"):
            source = dev.find("source")
            if dev.get("type") == "file" and source is not None and source.get("path"):
                return SerialLog(path=str(source.get("path")), appends=source.get("append") == "on")
    return None


def has_agent_channel(xml: ET.Element) -> bool:
    """Whether the definition gives the guest a QEMU guest agent channel (the agent may still be absent)."""
    return any(
        target.get("type") == "virtio" and target.get("name") == GUEST_AGENT_CHANNEL
        for target in xml.findall("./devices/channel/target")
    )


def has_pty_console(xml: ET.Element) -> bool:
    """A serial port or console on a pty: what libvirt's console stream can read."""
    return any(
        dev.get("type") == "pty" for kind in ("serial", "console") for dev in xml.findall(f"./devices/{kind}")
    )


def checkpoint_covers(checkpoint: ET.Element, target: str) -> bool:
    """Whether a ``<domaincheckpoint>`` keeps a bitmap of the disk ``target``."""
    for disk in checkpoint.findall("./disks/disk"):
        if disk.get("name") == target:
            return disk.get("checkpoint", "bitmap") != "no"
    return False


def image_record(attributes: dict[str, str]) -> str:
    """The ``<image>`` element a rebuild records in the domain's metadata."""
    return ET.tostring(ET.Element("image", attributes), encoding="unicode")


def current_identity(xml: ET.Element) -> GuestIdentity | None:
    """The identity the domain's metadata records: its public part (``IdentityStore`` adds the rest)."""
    element = xml.find(f"./metadata/{{{IDENTITY_NAMESPACE}}}identity")
    if element is None or not element.text:
        return None
    return GuestIdentity.model_validate_json(element.text)


def identity_secrets_digest(xml: ET.Element) -> str | None:
    """The digest naming the secret part of the recorded identity (kept outside the domain)."""
    element = xml.find(f"./metadata/{{{IDENTITY_NAMESPACE}}}identity")
    return None if element is None else element.get("secrets")


def seed_disk(xml: ET.Element) -> ET.Element | None:
    for disk in xml.findall("./devices/disk"):
        alias = disk.find("alias")
        if alias is not None and alias.get("name") == SEED_ALIAS:
            return disk
    return None


def seed_file(xml: ET.Element) -> str | None:
    disk = seed_disk(xml)
    source = disk.find("source") if disk is not None else None
    return source.get("file") if source is not None else None


def cdrom_bus(xml: ET.Element, instance: str) -> tuple[str, tuple[str, ...]]:
    """The bus a CD-ROM goes on for this machine type, and its target names."""
    os_type = xml.find("./os/type")
    machine = os_type.get("machine", "") if os_type is not None else ""
    arch = os_type.get("arch", "x86_64") if os_type is not None else "x86_64"
    if arch not in ("x86_64", "i686"):
        raise UnsupportedInstance(f"instance {instance!r}: no CD-ROM bus known for arch {arch}")
    return ("sata", _SATA_TARGETS) if "q35" in machine else ("ide", _IDE_TARGETS)


def with_seed(
    xml: ET.Element,
    instance: str,
    seed: str | None,
    identity: GuestIdentity | None,
    secrets: str | None = None,
) -> str:
    """The definition with ``seed`` as its seed CD-ROM (none: removed) and ``identity`` recorded.

    Only the identity's public part goes into the metadata (any local user reads it): the user data
    as its SHA-256, the secret part as the digest ``secrets`` that names its root-only file."""
    devices = xml.find("devices")
    if devices is None:
        raise UnsupportedInstance(f"instance {instance!r} has no <devices>")
    disk = seed_disk(xml)
    if seed is None:
        if disk is not None:
            devices.remove(disk)
    else:
        if disk is None:
            bus, targets = cdrom_bus(xml, instance)
            used = {t.get("dev") for t in xml.findall("./devices/disk/target")}
            free = [t for t in targets if t not in used]
            if not free:
                raise UnsupportedInstance(
                    f"instance {instance!r} has no free {bus} slot for the cloud-init seed CD-ROM"
                )
            disk = ET.Element("disk", {"type": "file", "device": "cdrom"})
            ET.SubElement(disk, "driver", {"name": "qemu", "type": "raw"})
            ET.SubElement(disk, "source", {"file": seed})
            ET.SubElement(disk, "target", {"dev": free[0], "bus": bus})
            ET.SubElement(disk, "readonly")
            ET.SubElement(disk, "alias", {"name": SEED_ALIAS})
            devices.append(disk)
        else:
            source = disk.find("source")
            if source is None:
                source = ET.SubElement(disk, "source")
            source.set("file", seed)
    metadata = xml.find("metadata")
    if metadata is None:
        metadata = ET.SubElement(xml, "metadata")
    for old in metadata.findall(f"{{{IDENTITY_NAMESPACE}}}identity"):
        metadata.remove(old)
    if identity is not None:
        attributes = {}
        if identity.user_data:
            attributes["user-data-sha256"] = hashlib.sha256(identity.user_data.encode()).hexdigest()
        if secrets is not None:
            attributes["secrets"] = secrets
        public = identity.model_copy(update={"user_data": None, "admin_password_hash": None})
        element = ET.SubElement(metadata, f"{{{IDENTITY_NAMESPACE}}}identity", attributes)
        element.text = public.model_dump_json()
    return ET.tostring(xml, encoding="unicode")
