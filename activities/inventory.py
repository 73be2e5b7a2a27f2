"""What a host's worker reports about its instances: the fleet selects from this, ``rebuild instances``
shows it.

Each entry carries the image the instance last got from a rebuild (the domain's ``<metadata>``), so a
fleet run again with the same image leaves those instances alone, and whether a rebuild would accept
the instance, by the checks inspect makes while it runs (``activities/rebuildable.py``).
"""

from __future__ import annotations

import asyncio
import fnmatch
import xml.etree.ElementTree as ET

from temporalio import activity

from activities import domain_xml as dx
from activities import libvirt_domain as ld
from activities import rebuildable
from activities.errors import InstanceNotFound, RebuildError, UnsupportedInstance
from activities.root_disks import RootDiskAt
from workflows.fleet_models import HostInventory, InventoryEntry, ListInstancesInput
from workflows.models import INSTANCE_NAME


class InventoryActivities:
    def __init__(self, libvirt_conn: ld.Libvirt) -> None:
        self.libvirt = libvirt_conn

    @activity.defn
    async def list_instances(self, request: ListInstancesInput) -> HostInventory:
        """Every domain on this host whose name a rebuild can use (and that matches the pattern)."""
        return HostInventory(instances=await asyncio.to_thread(self._list, request.name_pattern))

    def _list(self, pattern: str | None) -> list[InventoryEntry]:
        entries = []
        for name in self.libvirt.domain_names():
            if not INSTANCE_NAME.fullmatch(name) or (pattern and not fnmatch.fnmatchcase(name, pattern)):
                continue
            entry = _entry(self.libvirt.domain(name))
            if entry is not None:
                entries.append(entry)
        return sorted(entries, key=lambda e: e.instance)


def _entry(domain: ld.Domain) -> InventoryEntry | None:
    try:
        record = domain.image_record()
        running = domain.is_active()
        state = domain.state_word()
        xml = domain.definition()
        kind, refusal = _root_disk(domain, xml)
    except InstanceNotFound:
        return None  # undefined while we listed
    return InventoryEntry(
        instance=domain.name,
        running=running,
        image_sha256=record.get("sha256") if record is not None else None,
        image_url=record.get("url") if record is not None else None,
        state=state,
        root_disk=kind,
        refusal=refusal,
    )


def _root_disk(domain: ld.Domain, xml: ET.Element) -> tuple[str | None, str | None]:
    """The root disk's kind, and why a rebuild would refuse the instance (None: it would not)."""
    try:
        kind = dx.root_disk_element(xml, domain.name).get("type", "file")
    except UnsupportedInstance as err:
        return None, err.message
    try:
        root = RootDiskAt(domain, xml, dx.root_disk(xml, domain.name))
        rebuildable.refuse_unrebuildable(root, discard_snapshots=False)
    except RebuildError as err:
        if err.retryable or isinstance(err, InstanceNotFound):
            raise  # libvirt away (the listing is retried) or the domain gone (not listed)
        return kind, err.message  # unsupported, or its disk is missing: one instance, not the host
    return kind, None
