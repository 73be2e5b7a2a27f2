"""What a host's worker reports about its instances: the fleet selects from this, not from a file alone.

Each entry carries the image the instance last got from a rebuild (the domain's ``<metadata>``), so a
fleet run again with the same image leaves those instances alone.
"""

from __future__ import annotations

import asyncio
import fnmatch
from typing import Any

import libvirt
from temporalio import activity

from activities import libvirt_domain as ld
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
        try:
            domains = self.libvirt.connection().listAllDomains()
        except libvirt.libvirtError as err:
            raise ld.translate(err, "*") from None
        entries = []
        for domain in domains:
            name = domain.name()
            if not INSTANCE_NAME.match(name) or (pattern and not fnmatch.fnmatchcase(name, pattern)):
                continue
            entry = _entry(domain, name)
            if entry is not None:
                entries.append(entry)
        return sorted(entries, key=lambda e: e.instance)


def _entry(domain: Any, name: str) -> InventoryEntry | None:
    try:
        meta = ld.image_metadata(domain)
        running = ld.is_active(domain)
    except libvirt.libvirtError as err:
        if err.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            return None  # undefined while we listed
        raise ld.translate(err, name) from None
    return InventoryEntry(
        instance=name, running=running, image_sha256=meta.get("sha256") if meta is not None else None
    )
