"""Root disks that are storage-pool volumes (``<disk type='volume'>``), or block devices a pool manages.

The new disk is a new volume in the same pool, written while the instance still runs (stage); after the
stop the swap only points the disk at it (prepare), so the downtime is stop + define + start whatever
the image's size. The old volume is the backup until cleanup deletes it; restore points the disk back
and deletes the new one. At every instant the definition names the old volume or the new one, and the
volume it names is whole: a new volume is named only once it is written (``stage.json`` says so).

What the rebuild records lives in the worker's state directory (a volume has no "beside"): the new
volume's name before it is created, whether it is written, the old ``<disk>`` before the swap.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

from activities import domain_xml as dx
from activities import libvirt_storage as st
from activities import qemu_img
from activities.errors import (
    BootCheckFailed,
    DefinitionRefused,
    DiskMissing,
    HostOutOfSpace,
    HypervisorError,
    UnsupportedInstance,
)
from activities.root_disks.base import RootDiskAt, planned_disk
from activities.root_disks.records import RecordedSwap
from activities.state import write_atomically
from workflows import activity_models as io

_SAFE_NAME = re.compile(r"[^A-Za-z0-9_.+-]")
# What a new qcow2 volume needs before its clusters fill: metadata, a little.
OVERLAY_BYTES = 16 << 20


def locate(root: RootDiskAt) -> st.Volume:
    """The volume the root disk is: by pool and name, or the pool volume a block device is."""
    source = root.element.find("source")
    assert source is not None
    libvirt = root.domain.libvirt
    if root.disk.kind == "volume":
        if source.get("mode"):
            raise UnsupportedInstance(
                f"instance {root.domain.name!r}: root disk {root.disk.target} is an iSCSI volume used in "
                f"mode {source.get('mode')!r}; only volumes of pools that make volumes can be rebuilt"
            )
        pool = st.Pool(libvirt, str(source.get("pool")))
        volume = pool.volume(str(source.get("volume")))
        if volume is None:
            raise DiskMissing(f"root disk {root.disk.path} of {root.domain.name!r} does not exist")
        return volume
    found = st.volume_by_path(libvirt, str(source.get("dev")))
    if found is None:
        raise UnsupportedInstance(
            f"instance {root.domain.name!r}: root disk {root.disk.target} is the block device "
            f"{source.get('dev')}, which belongs to no libvirt storage pool: define a pool for it (a disk "
            "pool for a disk's partitions, a logical pool for an LVM volume group) so that a rebuild "
            "can make the new disk beside it"
        )
    return found


def _names(volume: st.Volume) -> set[str]:
    """How a disk's definition can name this volume (see ``domain_xml.chain``)."""
    return {f"volume:{volume.pool.name}/{volume.name}", volume.path()}


def _named_by(element: ET.Element, volume: st.Volume) -> bool:
    source = element.find("source")
    if source is None:
        return False
    if element.get("type") == "volume":
        return (source.get("pool"), source.get("volume")) == (volume.pool.name, volume.name)
    return source.get("dev") == volume.path()


class PoolVolume(RecordedSwap):
    @staticmethod
    def refuse_unsupported(root: RootDiskAt, discard_snapshots: bool) -> None:
        volume = locate(root)
        pool = volume.pool.info()
        where = f"instance {root.domain.name!r}: root disk {root.disk.target} ({root.disk.path})"
        if not pool.active:
            raise UnsupportedInstance(f"{where}: pool {pool.name!r} is not active (virsh pool-start)")
        if pool.kind not in st.FILE_POOLS + st.BLOCK_POOLS:
            raise UnsupportedInstance(
                f"{where}: a rebuild makes the new disk as a volume of its pool, and pools of type "
                f"{pool.kind!r} are not among those it knows to make volumes in "
                f"({', '.join(st.FILE_POOLS + st.BLOCK_POOLS)})"
            )
        if root.disk.kind == "block" and pool.kind not in st.BLOCK_POOLS:
            raise UnsupportedInstance(
                f"{where}: a block device in a {pool.kind} pool, whose volumes are files"
            )
        if pool.kind in st.BLOCK_POOLS and root.disk.format != "raw":
            raise UnsupportedInstance(f"{where}: a {root.disk.format} disk on a {pool.kind} pool's volume")
        names = _names(volume)
        for name, target, files in root.domain.libvirt.disk_users(skip=(root.domain.name, root.disk.target)):
            if names & set(files):
                raise UnsupportedInstance(f"{where} is shared: disk {target} of domain {name!r} uses it")
        backed = [v.name for v in volume.pool.volumes() if dx.volume_backing(v.definition()) == volume.path()]
        if backed:
            raise UnsupportedInstance(
                f"{where}: volumes {', '.join(sorted(backed))} of its pool are backed by it"
            )

    @staticmethod
    async def virtual_size(root: RootDiskAt) -> int:
        return await asyncio.to_thread(lambda: locate(root).capacity())

    async def running_on_new_disk(self, root: RootDiskAt, request: io.VerifyInstanceInput) -> str:
        """The running disk names the volume stage wrote."""
        assert request.rebuild_id is not None
        planned = self._planned(request.rebuild_id)
        new = None
        if planned is not None:
            new = await asyncio.to_thread(
                st.Pool(root.domain.libvirt, str(planned["pool"])).volume, planned["name"]
            )
        if new is None or not await asyncio.to_thread(_named_by, root.element, new):
            raise BootCheckFailed(
                f"instance {root.domain.name!r} runs its root disk {root.disk.target} on {root.disk.path}, "
                "not on the volume this rebuild wrote"
            )
        return f"root disk {root.disk.target} runs on the new volume {new.pool.name}/{new.name}"

    async def plan(self, root: RootDiskAt, request: io.PlanRootDiskInput) -> io.PlannedRootDisk:
        """Stage's choice without its writing: the kind of new volume, refused where the pool has no
        room for it."""
        old = await asyncio.to_thread(locate, root)
        pool = await asyncio.to_thread(old.pool.info)
        _refuse_no_room(root, pool, old)
        capacity = await asyncio.to_thread(old.capacity)
        if _overlays(pool, root.disk.format):
            how = "qcow2 volume on the pool's copy of the image"
        elif pool.kind in st.FILE_POOLS:
            how = "raw volume, a reflink or a copy of the image"
        else:
            how = "raw volume written from the image"
        size = max(capacity, request.image_virtual_size, request.min_virtual_size)
        return planned_disk(root, capacity, size, f"volume: {how} in pool {pool.name}")

    async def stage(self, root: RootDiskAt, request: io.StageRootDiskInput) -> io.StagedRootDisk:
        """A new volume beside the old one, written; a retry finds a written one, or starts again."""
        old = await asyncio.to_thread(locate, root)
        pool = await asyncio.to_thread(old.pool.info)
        if self._planned(request.rebuild_id) is None:
            _refuse_no_room(root, pool, old)
        size = max(
            await asyncio.to_thread(old.capacity), request.image_virtual_size, request.min_virtual_size
        )
        plan = self._record(request.rebuild_id, "stage.json")
        planned = self._planned(request.rebuild_id)
        if planned is not None:
            found = await asyncio.to_thread(old.pool.volume, str(planned["name"]))
            if found is not None and planned.get("written"):
                return _staged(found, size, str(planned["how"]))
            if found is not None:
                await asyncio.to_thread(found.delete)  # half-written by an attempt that died
            name = str(planned["name"])
        else:
            name = await asyncio.to_thread(_new_name, root, old, pool, request.rebuild_id)
        write_atomically(plan, json.dumps({"pool": pool.name, "name": name, "written": False, "how": ""}))
        base = self.state.image_path(request.image_sha256)
        if _overlays(pool, root.disk.format):
            image = await self._pool_copy(old.pool, base, request.image_sha256, request.image_format)
            backing = (await asyncio.to_thread(image.path), request.image_format)
            definition = dx.volume_definition(name, size, "qcow2", backing)
            new = await asyncio.to_thread(old.pool.create, definition)
            how = "qcow2 volume on the pool's copy of the image"
        elif pool.kind in st.FILE_POOLS:
            image = await self._pool_copy(old.pool, base, request.image_sha256, request.image_format)
            new, how = await asyncio.to_thread(_clone, old.pool, image, name, size)
        else:
            # A partition or a logical volume has no format of its own to name: its bytes are raw.
            definition = dx.volume_definition(name, size, None)
            new = await asyncio.to_thread(old.pool.create, definition)
            await qemu_img.convert_into(
                str(base), request.image_format, await asyncio.to_thread(new.path), "raw"
            )
            how = "raw volume written from the image"
        record = {"pool": pool.name, "name": name, "written": True, "how": how}
        write_atomically(plan, json.dumps(record))
        return _staged(new, size, how)

    async def _pool_copy(self, pool: st.Pool, base: Path, sha256: str, fmt: str) -> st.Volume:
        """The image as a volume of this pool, uploaded once per image and pool."""
        done = self.state.pool_images(pool.name) / sha256
        name = f"rebuild-image-{sha256[:16]}.{fmt}"
        found = await asyncio.to_thread(pool.volume, name)
        if found is not None and done.exists():
            return found
        if found is not None:
            await asyncio.to_thread(found.delete)
        definition = dx.volume_definition(name, base.stat().st_size, fmt)
        image = await asyncio.to_thread(pool.create, definition)
        # The stage activity heartbeats meanwhile (keep_alive): an upload of a large image takes a while.
        await asyncio.to_thread(image.upload, base)
        done.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(done, name)
        return image

    async def discard_staged(self, root: RootDiskAt, request: io.DiscardStagedRootDiskInput) -> None:
        planned = self._planned(request.rebuild_id)
        if planned is None:
            return
        pool = st.Pool(root.domain.libvirt, str(planned["pool"]))
        found = await asyncio.to_thread(pool.volume, str(planned["name"]))
        if found is not None and not await asyncio.to_thread(_named_by, root.element, found):
            await asyncio.to_thread(found.delete)
        self._record(request.rebuild_id, "stage.json").unlink(missing_ok=True)

    async def prepare(self, root: RootDiskAt, request: io.PrepareRootDiskInput) -> io.PreparedRootDisk:
        """Point the disk at the staged volume; the old one stays as it is, the backup."""
        planned = self._planned(request.rebuild_id)
        if planned is None or not planned.get("written"):
            raise DiskMissing(f"no staged volume for {request.instance!r}: stage did not finish")
        pool = st.Pool(root.domain.libvirt, str(planned["pool"]))
        new = await asyncio.to_thread(pool.volume, str(planned["name"]))
        if new is None:
            raise DiskMissing(f"the staged volume {planned['pool']}/{planned['name']} is gone")

        def old_name() -> list[str]:
            old = locate(root)
            return [old.pool.name, old.name]

        original = await self._keep_old_disk(root, request, old_name)
        fmt = dx.volume_format(await asyncio.to_thread(new.definition))
        if root.disk.kind == "volume":
            source = {"pool": pool.name, "volume": new.name}
        else:
            source = {"dev": await asyncio.to_thread(new.path)}
        disk = dx.pointed_at(original, source, "qcow2" if fmt == "qcow2" else "raw")
        if not dx.same(root.element, disk):
            await asyncio.to_thread(root.domain.update_disk, root.xml, disk)
        await self.checkpoints.reach("prepare.after-new-disk")
        old_pool, old_volume = self._old_disk(request.rebuild_id)
        return io.PreparedRootDisk(
            disk_path=f"{pool.name}/{new.name}",
            backup_path=f"{old_pool}/{old_volume}",
            virtual_size=await asyncio.to_thread(new.capacity),
        )

    async def remove_backup(self, root: RootDiskAt, request: io.RemoveBackupInput) -> None:
        """The old volume goes (after its snapshots' metadata, with --discard-snapshots), unless the
        disk names it again."""
        await self._forget_snapshots(root, request.rebuild_id)
        old = self._old_disk(request.rebuild_id)
        if old is not None:
            pool_name, name = old
            found = await asyncio.to_thread(st.Pool(root.domain.libvirt, pool_name).volume, name)
            if found is not None and not await asyncio.to_thread(_named_by, root.element, found):
                await asyncio.to_thread(found.delete)
        shutil.rmtree(self.state.rebuild_records(request.rebuild_id), ignore_errors=True)


def _refuse_no_room(root: RootDiskAt, pool: st.PoolInfo, volume: st.Volume) -> None:
    """Before the first write (stage runs before the stop): the pool has room for the new volume."""
    needed = OVERLAY_BYTES if _overlays(pool, root.disk.format) else volume.capacity()
    if pool.available < needed:
        raise HostOutOfSpace(
            f"instance {root.domain.name!r}: root disk {root.disk.target} ({root.disk.path}): pool "
            f"{pool.name!r} has {pool.available} bytes free, the new volume needs {needed}"
        )


def _overlays(pool: st.PoolInfo, fmt: str) -> bool:
    """A qcow2 disk in a pool of files gets a qcow2 volume on the pool's copy of the image (O(1))."""
    return fmt == "qcow2" and pool.kind in st.FILE_POOLS


def _clone(pool: st.Pool, image: st.Volume, name: str, size: int) -> tuple[st.Volume, str]:
    """A raw volume from the pool's copy of the image: a reflink where its file system has them."""
    definition = dx.volume_definition(name, size, "raw")
    try:
        new, how = pool.create(definition, image, reflink=True), "raw volume, a reflink of the image"
    except (HypervisorError, DefinitionRefused):
        new, how = pool.create(definition, image), "raw volume, a copy of the image"
    new.resize(size)
    return new, how


def _new_name(root: RootDiskAt, old: st.Volume, pool: st.PoolInfo, rebuild_id: str) -> str:
    """Named from the rebuild where the pool lets us name volumes; a disk pool names its partitions."""
    if pool.kind == "disk":
        used = [v.name for v in old.pool.volumes()]
        stem = re.sub(r"\d+$", "", old.name)
        numbers = [int(n[len(stem) :]) for n in used if n.startswith(stem) and n[len(stem) :].isdigit()]
        return f"{stem}{max(numbers, default=0) + 1}"
    suffix = old.name.rsplit(".", 1)[1] if "." in old.name else ""
    name = f"{_SAFE_NAME.sub('_', root.domain.name)}-root-{_SAFE_NAME.sub('_', rebuild_id)[-12:]}"
    return f"{name}.{suffix}" if suffix else name


def _staged(volume: st.Volume, size: int, how: str) -> io.StagedRootDisk:
    return io.StagedRootDisk(
        staged_at=f"{volume.pool.name}/{volume.name}", virtual_size=size, mode=f"volume: {how}"
    )
