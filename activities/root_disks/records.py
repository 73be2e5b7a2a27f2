"""What a back end whose disks are not files records in the worker's state directory (a pool volume or
an RBD image has no "beside" to keep it): the staged disk's plan, the old ``<disk>`` before the swap;
and the restore that puts that ``<disk>`` back, the same for every such back end."""

from __future__ import annotations

import asyncio
import json
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any

from activities import domain_xml as dx
from activities.checkpoints import Checkpoints
from activities.root_disks.base import RootDiskAt
from activities.state import StateDir, write_atomically
from workflows import activity_models as io

# What prepare records before the swap; restore removes them once the old <disk> is back.
SWAP_RECORDS = ("disk.xml", "old.json", "snapshots.json")


class RecordedSwap:
    """A back end whose swap redefines the disk to name another volume or image."""

    def __init__(self, state: StateDir, checkpoints: Checkpoints) -> None:
        self.state = state
        self.checkpoints = checkpoints

    def _record(self, rebuild_id: str, name: str) -> Path:
        directory = self.state.rebuild_records(rebuild_id)
        directory.mkdir(parents=True, exist_ok=True)
        return directory / name

    def _planned(self, rebuild_id: str) -> dict[str, Any] | None:
        """Stage's plan (``stage.json``): the new disk's name before it exists, and whether it is whole."""
        try:
            planned: dict[str, Any] = json.loads(self._record(rebuild_id, "stage.json").read_text())
        except FileNotFoundError:
            return None
        return planned

    def began(self, root: RootDiskAt, rebuild_id: str) -> bool:
        return self._record(rebuild_id, "disk.xml").exists()

    async def restore(self, root: RootDiskAt, request: io.RestoreRootDiskInput) -> None:
        """The old disk's element back; the new disk goes with stage's undo (discard_staged)."""
        record = self._record(request.rebuild_id, "disk.xml")
        if not record.exists():
            return
        await self.checkpoints.reach("restore.before-swap")
        original = dx.parse(record.read_text())
        if not dx.same(root.element, original):
            await asyncio.to_thread(root.domain.update_disk, root.xml, original)
        for name in SWAP_RECORDS:
            self._record(request.rebuild_id, name).unlink(missing_ok=True)

    async def _keep_old_disk(
        self, root: RootDiskAt, request: io.PrepareRootDiskInput, old_name: Callable[[], Any]
    ) -> ET.Element:
        """Once, before the swap: what names the old disk (``old_name()``, kept as JSON), with
        --discard-snapshots the snapshots that go with it, and last the old ``<disk>`` (its record is
        what ``began`` asks); the old ``<disk>`` as recorded."""
        record = self._record(request.rebuild_id, "disk.xml")
        if not record.exists():
            old = await asyncio.to_thread(old_name)
            write_atomically(self._record(request.rebuild_id, "old.json"), json.dumps(old))
            if request.discard_snapshots:
                names = await asyncio.to_thread(root.domain.snapshot_names)
                write_atomically(self._record(request.rebuild_id, "snapshots.json"), json.dumps(names))
            write_atomically(record, dx.to_string(root.element))
        return dx.parse(record.read_text())

    def _old_disk(self, rebuild_id: str) -> Any:
        """What prepare recorded as naming the old disk; None before prepare or after cleanup."""
        try:
            return json.loads(self._record(rebuild_id, "old.json").read_text())
        except FileNotFoundError:
            return None

    async def _forget_snapshots(self, root: RootDiskAt, rebuild_id: str) -> None:
        """With --discard-snapshots, at cleanup: the snapshots' metadata goes with the old disk."""
        snapshots = self._record(rebuild_id, "snapshots.json")
        if snapshots.exists():
            names = [str(n) for n in json.loads(snapshots.read_text())]
            await asyncio.to_thread(root.domain.drop_snapshot_metadata, names)
