"""Activities for the guest's identity: build its cloud-init seed and attach it, undo that, clean up.

The seed is a read-only CD-ROM beside the root disk, marked with the user alias ``ua-rebuild-seed`` so a
later rebuild finds and replaces it. The identity itself (minus any password in clear: there is none)
lives in the domain's ``<metadata>``; seed and metadata change in one ``define``, so a crash leaves
the old pair or the new one. What the instance had before is written beside the disk first, and the
undo puts exactly that back; cleanup removes the old seed file once the rebuild is kept.
"""

from __future__ import annotations

import asyncio
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from temporalio import activity

from activities import domain_xml as dx
from activities import libvirt_domain as ld
from activities.errors import InvalidRequest, UnsupportedInstance
from activities.seed import build_seed
from activities.state import seed_path, seed_undo_path, write_atomically
from workflows.identity import GuestIdentity, identity_problems
from workflows.models import PrepareSeedInput, RemoveSeedBackupInput, RestoreSeedInput, SeedResult

IDENTITY_NAMESPACE = "https://durable-rebuild.dev/xmlns/identity/1"
SEED_ALIAS = dx.SEED_ALIAS
_IDE_TARGETS = ("hda", "hdb", "hdc", "hdd")
_SATA_TARGETS = tuple(f"sd{chr(ord('a') + n)}" for n in range(26))


class _Before(BaseModel):
    """The instance's seed and identity before this rebuild touched them."""

    seed_path: str | None = None
    identity: GuestIdentity | None = None


def current_identity(xml: ET.Element) -> GuestIdentity | None:
    element = xml.find(f"./metadata/{{{IDENTITY_NAMESPACE}}}identity")
    if element is None or not element.text:
        return None
    return GuestIdentity.model_validate_json(element.text)


def _seed_disk(xml: ET.Element) -> ET.Element | None:
    for disk in xml.findall("./devices/disk"):
        alias = disk.find("alias")
        if alias is not None and alias.get("name") == SEED_ALIAS:
            return disk
    return None


def _cdrom_bus(xml: ET.Element, instance: str) -> tuple[str, tuple[str, ...]]:
    os_type = xml.find("./os/type")
    machine = os_type.get("machine", "") if os_type is not None else ""
    arch = os_type.get("arch", "x86_64") if os_type is not None else "x86_64"
    if arch not in ("x86_64", "i686"):
        raise UnsupportedInstance(f"instance {instance!r}: no CD-ROM bus known for arch {arch}")
    return ("sata", _SATA_TARGETS) if "q35" in machine else ("ide", _IDE_TARGETS)


def with_seed(xml: ET.Element, instance: str, seed: str | None, identity: GuestIdentity | None) -> str:
    """The definition with ``seed`` as its seed CD-ROM (none: removed) and ``identity`` recorded."""
    devices = xml.find("devices")
    if devices is None:
        raise UnsupportedInstance(f"instance {instance!r} has no <devices>")
    disk = _seed_disk(xml)
    if seed is None:
        if disk is not None:
            devices.remove(disk)
    else:
        if disk is None:
            bus, targets = _cdrom_bus(xml, instance)
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
        ET.SubElement(metadata, f"{{{IDENTITY_NAMESPACE}}}identity").text = identity.model_dump_json()
    return ET.tostring(xml, encoding="unicode")


class IdentityActivities:
    def __init__(self, libvirt_conn: ld.Libvirt) -> None:
        self.libvirt = libvirt_conn

    async def _definition(self, instance: str, target: str | None) -> tuple[ET.Element, ld.RootDisk]:
        def read(domain: Any) -> tuple[ET.Element, ld.RootDisk]:
            xml = ld.inactive_xml(domain)
            return xml, dx.step_root_disk(xml, instance, target)

        return await asyncio.to_thread(self.libvirt.with_domain, instance, read)

    @activity.defn
    async def prepare_seed(self, request: PrepareSeedInput) -> SeedResult:
        """Build the new seed from the instance's identity and the request's change, and attach it."""
        if request.change is not None and (problems := identity_problems(request.change)):
            raise InvalidRequest("; ".join(problems))
        xml, disk = await self._definition(request.instance, request.root_disk_target)
        undo = seed_undo_path(disk.path, request.rebuild_id)
        if undo.exists():
            # A retry: the definition may already hold the new seed; what came before is recorded.
            before = _Before.model_validate_json(undo.read_text())
        else:
            old = _seed_disk(xml)
            source = old.find("source") if old is not None else None
            before = _Before(
                seed_path=source.get("file") if source is not None else None, identity=current_identity(xml)
            )
            write_atomically(undo, before.model_dump_json(), mode=0o600)
        identity = before.identity or GuestIdentity()
        if request.change is not None:
            identity = request.change.applied_to(identity)
        seed = seed_path(disk.path, request.rebuild_id)
        instance_id = f"{xml.findtext('uuid')}-{request.rebuild_id}"
        await asyncio.to_thread(build_seed, identity, instance_id, seed)
        definition = with_seed(xml, request.instance, str(seed), identity)
        await asyncio.to_thread(self.libvirt.define, request.instance, definition)
        return SeedResult(
            seed_path=str(seed),
            instance_id=instance_id,
            seed_format=identity.seed_format,
            summary=describe_identity(identity),
        )

    @activity.defn
    async def restore_seed(self, request: RestoreSeedInput) -> None:
        """Put the old seed and identity back. Nothing recorded: nothing of ours to undo."""
        xml, disk = await self._definition(request.instance, request.root_disk_target)
        undo = seed_undo_path(disk.path, request.rebuild_id)
        if not undo.exists():
            return
        before = _Before.model_validate_json(undo.read_text())
        definition = with_seed(xml, request.instance, before.seed_path, before.identity)
        await asyncio.to_thread(self.libvirt.define, request.instance, definition)
        new = seed_path(disk.path, request.rebuild_id)
        if str(new) != before.seed_path:
            new.unlink(missing_ok=True)
        undo.unlink()

    @activity.defn
    async def remove_seed_backup(self, request: RemoveSeedBackupInput) -> None:
        """The rebuild is kept: the old seed file goes (only one this project made, beside the disk)."""
        _, disk = await self._definition(request.instance, request.root_disk_target)
        undo = seed_undo_path(disk.path, request.rebuild_id)
        if not undo.exists():
            return
        before = _Before.model_validate_json(undo.read_text())
        new = seed_path(disk.path, request.rebuild_id)
        old = Path(before.seed_path) if before.seed_path else None
        if (
            old is not None
            and old != new
            and old.parent == new.parent
            and old.name.startswith(f"{Path(disk.path).name}.seed-")
        ):
            old.unlink(missing_ok=True)
        undo.unlink()


def describe_identity(identity: GuestIdentity) -> str:
    """For status and the Web UI: what the guest gets, with nothing secret in it."""
    parts = [f"seed {identity.seed_format}"]
    if identity.hostname:
        parts.append(f"hostname {identity.hostname}")
    if identity.ssh_keys:
        parts.append(f"{len(identity.ssh_keys)} SSH key(s)")
    if identity.user_data:
        parts.append(f"user data {len(identity.user_data.encode())} bytes")
    if identity.admin_password_hash:
        parts.append("admin password set (hashed)")
    if identity.metadata:
        parts.append(f"{len(identity.metadata)} metadata item(s)")
    return ", ".join(parts)
