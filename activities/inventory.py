"""What a host's worker reports about its instances: the fleet selects from this, not from a file alone.

Each entry carries the image the instance last got from a rebuild (the domain's ``<metadata>``), so a
fleet run again with the same image leaves those instances alone.
"""

from __future__ import annotations

import asyncio
import fnmatch

from temporalio import activity

from activities import libvirt_domain as ld
from activities.errors import InstanceNotFound
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
    except InstanceNotFound:
        return None  # undefined while we listed
    return InventoryEntry(
        instance=domain.name,
        running=running,
        image_sha256=record.get("sha256") if record is not None else None,
    )
