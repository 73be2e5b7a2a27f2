"""Root disks that are Ceph RBD images (``<disk type='network'><source protocol='rbd'>``).

The image is imported into the pool once per digest as ``rebuild-base-<sha256>`` with a protected
snapshot; each rebuild's new root is a clone of that snapshot (constant time, whatever the image's
size), made while the instance still runs (stage) and grown to the old root's size. After the stop the
swap only points the disk's ``<source name>`` at the clone, keeping its monitors, auth and the rest, so
the downtime is stop + define + start. The old image stays, under its own name, until cleanup removes
it; restore points the disk back. What the rebuild records (the clone's name before it is made, the
old ``<disk>`` before the swap) lives in the worker's state directory, as for pool volumes.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import re
import shutil
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from activities import domain_xml as dx
from activities import qemu_img
from activities.ceph_rbd import Rbd, RbdSource, rbd_session, rbd_source
from activities.errors import (
    BootCheckFailed,
    DiskMissing,
    DiskToolFailed,
    InstanceNotFound,
    UnsupportedInstance,
)
from activities.rbd_cache import SNAPSHOT, base_name, records_dir
from activities.root_disks.base import RootDiskAt, planned_disk
from activities.root_disks.records import RecordedSwap
from activities.state import write_atomically
from workflows import activity_models as io

_SAFE_NAME = re.compile(r"[^A-Za-z0-9_.+-]")


def _where(root: RootDiskAt) -> str:
    return f"instance {root.domain.name!r}: root disk {root.disk.target} ({root.disk.path})"


def _source(root: RootDiskAt) -> RbdSource:
    return rbd_source(root.element, _where(root))


def _names_image(element: ET.Element, source: RbdSource, image: str) -> bool:
    found = element.find("source")
    return found is not None and found.get("name") == f"{source.pool}/{image}"


class RbdImage(RecordedSwap):
    def _session(self, root: RootDiskAt) -> Any:
        return rbd_session(root.domain.libvirt, _source(root), _where(root), self.state.root / "rbd")

    @staticmethod
    def refuse_unsupported(root: RootDiskAt, discard_snapshots: bool) -> None:
        """Refused before the stop: an image the rebuild could not reach, or whose removal at cleanup
        would take something else with it."""
        where, source = _where(root), _source(root)
        if root.disk.format != "raw":
            raise UnsupportedInstance(f"{where}: an RBD disk in {root.disk.format}; RBD images are raw")
        with rbd_session(root.domain.libvirt, source, where) as rbd:
            try:
                info = rbd.info(source.image)
            except DiskToolFailed as err:
                raise UnsupportedInstance(
                    f"{where}: the cluster cannot be asked about it: {err.message}"
                ) from None
            if info is None:
                raise DiskMissing(f"{where}: pool {source.pool!r} has no image {source.image!r}")
            snapshots = [str(s["name"]) for s in rbd.snapshots(source.image)]
        if snapshots:
            raise UnsupportedInstance(
                f"{where}: the RBD image has snapshots ({', '.join(snapshots)}), which cleanup would "
                "lose with it; remove them (rbd snap purge) or flatten their clones first"
            )
        for name, definition in _other_definitions(root):
            for disk in definition.findall("./devices/disk"):
                if disk.get("type") == "network" and _names_image(disk, source, source.image):
                    raise UnsupportedInstance(f"{where} is shared: domain {name!r} uses the same RBD image")

    @staticmethod
    async def virtual_size(root: RootDiskAt) -> int:
        def read() -> int:
            source = _source(root)
            with rbd_session(root.domain.libvirt, source, _where(root)) as rbd:
                info = rbd.info(source.image)
            if info is None:
                raise DiskMissing(f"{_where(root)}: the RBD image is gone")
            return int(info["size"])

        return await asyncio.to_thread(read)

    async def plan(self, root: RootDiskAt, request: io.PlanRootDiskInput) -> io.PlannedRootDisk:
        """Stage's choice without its writing: a clone of the image's base, imported first where the
        pool has none yet."""
        source = _source(root)
        current = await self.virtual_size(root)
        size = max(current, request.image_virtual_size, request.min_virtual_size)
        with self._session(root) as rbd:
            base = await asyncio.to_thread(rbd.info, base_name(request.image_sha256))
        how = "a clone of its base" if base is not None else "an import of the image, then a clone of it"
        return planned_disk(root, current, size, f"rbd: {how} in pool {source.pool}")

    async def stage(self, root: RootDiskAt, request: io.StageRootDiskInput) -> io.StagedRootDisk:
        """A clone of the image's base beside the old image; a retry finds it made, or makes it again."""
        source = _source(root)
        plan = self._record(request.rebuild_id, "stage.json")
        with self._session(root) as rbd:
            old = await asyncio.to_thread(rbd.info, source.image)
            if old is None:
                raise DiskMissing(f"{_where(root)}: the RBD image is gone")
            size = max(int(old["size"]), request.image_virtual_size, request.min_virtual_size)
            planned = self._planned(request.rebuild_id)
            if planned is not None and planned.get("written"):
                found = await asyncio.to_thread(rbd.info, str(planned["name"]))
                if found is not None:
                    return _staged(source, str(planned["name"]), int(found["size"]), str(planned["how"]))
            name = str(planned["name"]) if planned is not None else _new_name(root, request.rebuild_id)
            write_atomically(plan, json.dumps({"pool": source.pool, "name": name, "written": False}))
            how = await self._base(rbd, request.image_sha256, request.image_format)
            if await asyncio.to_thread(rbd.info, name) is not None:
                await asyncio.to_thread(rbd.remove, name)  # half-made by an attempt that died
            began = time.monotonic()
            await asyncio.to_thread(
                rbd.call, "clone", rbd.image(f"{base_name(request.image_sha256)}@{SNAPSHOT}"), rbd.image(name)
            )
            clone = await asyncio.to_thread(rbd.info, name)
            assert clone is not None
            if int(clone["size"]) < size:
                await asyncio.to_thread(
                    rbd.call, "resize", "--no-progress", "--size", f"{size}B", rbd.image(name)
                )
            how = f"{how}, cloned in {time.monotonic() - began:.2f} s"
        write_atomically(plan, json.dumps({"pool": source.pool, "name": name, "written": True, "how": how}))
        return _staged(source, name, size, how)

    async def _base(self, rbd: Rbd, sha256: str, fmt: str) -> str:
        """The image's base in the pool, with its protected snapshot: imported once per digest and pool
        (a lock in the state directory keeps two rebuilds on this host from importing it both)."""
        records = records_dir(self.state, rbd.source.pool)
        records.mkdir(parents=True, exist_ok=True)
        with open(records / f"{sha256}.lock", "w") as lock:
            await asyncio.to_thread(fcntl.flock, lock, fcntl.LOCK_EX)
            name = base_name(sha256)
            if await asyncio.to_thread(rbd.info, name) is not None:
                snapshots = {str(s["name"]): s for s in await asyncio.to_thread(rbd.snapshots, name)}
                if SNAPSHOT in snapshots:
                    if str(snapshots[SNAPSHOT].get("protected")) != "true":
                        await asyncio.to_thread(rbd.call, "snap", "protect", rbd.image(f"{name}@{SNAPSHOT}"))
                    self._note_base(records, rbd.source, sha256, imported=False)
                    return "rbd clone of the base image (imported before)"
                await asyncio.to_thread(rbd.remove, name)  # an import that died half-way
            began = time.monotonic()
            await self._import(rbd, sha256, fmt, name)
            await asyncio.to_thread(rbd.call, "snap", "create", rbd.image(f"{name}@{SNAPSHOT}"))
            await asyncio.to_thread(rbd.call, "snap", "protect", rbd.image(f"{name}@{SNAPSHOT}"))
            self._note_base(records, rbd.source, sha256, imported=True)
            return f"rbd clone of the base image (imported in {time.monotonic() - began:.2f} s)"

    async def _import(self, rbd: Rbd, sha256: str, fmt: str, name: str) -> None:
        """The cached image's guest bytes into a new image: a raw image as it is, a qcow2 one through a
        sparse raw file beside the cache (qemu-img's rbd driver would need more than its limits allow)."""
        cached = self.state.image_path(sha256)
        if fmt == "raw":
            await rbd.import_file(cached, name)
            return
        raw = self.state.root / "rbd" / f"{sha256}.raw"
        raw.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            raw.unlink(missing_ok=True)
            await qemu_img.convert_into(str(cached), fmt, str(raw), "raw", create=True)
            await rbd.import_file(raw, name)
        finally:
            raw.unlink(missing_ok=True)

    @staticmethod
    def _note_base(records: Path, source: RbdSource, sha256: str, *, imported: bool) -> None:
        """What `rebuild cache list` reads: where the base is, how to reach it, how often it was imported."""
        record = records / sha256
        try:
            imports = int(json.loads(record.read_text()).get("imports", 0))
        except (FileNotFoundError, ValueError):
            imports = 0
        note = {
            "pool": source.pool,
            "image": base_name(sha256),
            "hosts": list(source.hosts),
            "user": source.user,
            "secret_uuid": source.secret_uuid,
            "secret_usage": source.secret_usage,
            "imports": imports + (1 if imported else 0),
        }
        write_atomically(record, json.dumps(note))

    async def discard_staged(self, root: RootDiskAt, request: io.DiscardStagedRootDiskInput) -> None:
        planned = self._planned(request.rebuild_id)
        if planned is None:
            return
        source = _source(root)
        name = str(planned["name"])
        if not _names_image(root.element, source, name):
            with self._session(root) as rbd:
                if await asyncio.to_thread(rbd.info, name) is not None:
                    await asyncio.to_thread(rbd.remove, name)
        self._record(request.rebuild_id, "stage.json").unlink(missing_ok=True)

    async def running_on_new_disk(self, root: RootDiskAt, request: io.VerifyInstanceInput) -> str:
        """The running disk's ``<source name>`` is the clone stage made."""
        assert request.rebuild_id is not None
        planned = self._planned(request.rebuild_id)
        source = _source(root)
        if planned is None or not _names_image(root.element, source, str(planned["name"])):
            raise BootCheckFailed(
                f"instance {root.domain.name!r} runs its root disk {root.disk.target} on {root.disk.path}, "
                "not on the RBD image this rebuild cloned"
            )
        return f"root disk {root.disk.target} runs on the new RBD image {source.pool}/{planned['name']}"

    async def prepare(self, root: RootDiskAt, request: io.PrepareRootDiskInput) -> io.PreparedRootDisk:
        """Point the disk at the clone; the old image stays as it is, the backup."""
        planned = self._planned(request.rebuild_id)
        if planned is None or not planned.get("written"):
            raise DiskMissing(f"no staged RBD image for {request.instance!r}: stage did not finish")
        original = await self._keep_old_disk(root, request, lambda: _source(root).image)
        old = rbd_source(original, _where(root))
        new = str(planned["name"])
        with self._session(root) as rbd:
            found = await asyncio.to_thread(rbd.info, new)
        if found is None:
            raise DiskMissing(f"the staged RBD image {old.pool}/{new} is gone")
        disk = dx.rbd_pointed_at(original, f"{old.pool}/{new}")
        if not dx.same(root.element, disk):
            await asyncio.to_thread(root.domain.update_disk, root.xml, disk)
        await self.checkpoints.reach("prepare.after-new-disk")
        return io.PreparedRootDisk(
            disk_path=f"rbd:{old.pool}/{new}", backup_path=f"rbd:{old.name}", virtual_size=int(found["size"])
        )

    async def remove_backup(self, root: RootDiskAt, request: io.RemoveBackupInput) -> None:
        """The old image goes (after its snapshots' metadata, with --discard-snapshots), unless the
        disk names it again."""
        await self._forget_snapshots(root, request.rebuild_id)
        old = self._old_disk(request.rebuild_id)
        if old is not None:
            image = str(old)
            if not _names_image(root.element, _source(root), image):
                with self._session(root) as rbd:
                    if await asyncio.to_thread(rbd.info, image) is not None:
                        await asyncio.to_thread(rbd.remove, image)
        shutil.rmtree(self.state.rebuild_records(request.rebuild_id), ignore_errors=True)


def _other_definitions(root: RootDiskAt) -> list[tuple[str, ET.Element]]:
    libvirt = root.domain.libvirt
    found: list[tuple[str, ET.Element]] = []
    for name in libvirt.domain_names():
        if name == root.domain.name:
            continue
        try:
            found.extend((name, xml) for xml in libvirt.domain(name).definitions())
        except InstanceNotFound:
            continue  # gone since the listing
    return found


def _new_name(root: RootDiskAt, rebuild_id: str) -> str:
    return f"{_SAFE_NAME.sub('_', root.domain.name)}-root-{_SAFE_NAME.sub('_', rebuild_id)[-12:]}"


def _staged(source: RbdSource, name: str, size: int, how: str) -> io.StagedRootDisk:
    return io.StagedRootDisk(staged_at=f"rbd:{source.pool}/{name}", virtual_size=size, mode=f"rbd: {how}")
