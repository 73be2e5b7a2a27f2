"""Activities that change root disk files: prepare the new one, restore the old one, drop the backup.

The invariant these keep: at every instant the root disk path holds either the old disk or the new
one. The old disk is kept as a hard link (a second name for the same file, made in constant time), and
the new disk replaces the path by an atomic rename; nothing is ever copied.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from temporalio import activity

from activities import domain_xml as dx
from activities import libvirt_domain as ld
from activities import qcow2, qemu_img, rebuildable
from activities.checkpoints import Checkpoints
from activities.errors import DiskMissing, HostOutOfSpace, ImageTooLarge, InstanceNotStopped, InvalidRequest
from activities.heartbeat import keep_alive
from activities.state import (
    StateDir,
    backup_path,
    fsync_dir,
    new_disk_path,
    original_format_path,
    record_path,
    write_atomically,
)
from workflows.models import (
    PreparedRootDisk,
    PrepareRootDiskInput,
    RemoveBackupInput,
    RestoreRootDiskInput,
)

# No request makes a root disk larger than this, whatever limit it names (qcow2's own limit is higher).
MAX_ROOT_DISK_BYTES = 64 << 40
DISK_FORMATS = ("raw", "qcow2")


def _validate_prepare(request: PrepareRootDiskInput) -> None:
    """Anyone who reaches Temporal can call prepare: it checks its own input."""
    if request.image_format not in DISK_FORMATS:
        raise InvalidRequest(f"image format must be raw or qcow2, not {request.image_format[:40]!r}")
    limit = min(request.max_virtual_size or MAX_ROOT_DISK_BYTES, MAX_ROOT_DISK_BYTES)
    for what, size in (("image", request.image_virtual_size), ("minimum disk", request.min_virtual_size)):
        if not 0 <= size <= limit:
            raise ImageTooLarge(f"{what} size {size} bytes is over the limit of {limit} bytes")


@dataclass(frozen=True)
class _RootFile:
    """The root disk as a rebuild works on it: its definition, and the file it really is."""

    xml: ET.Element
    disk: dx.RootDisk
    # The definition's path with symlinks resolved: backups and the new disk go next to the file
    # itself, and the swap replaces the file, never the link.
    real: str

    def record(self, rebuild_id: str) -> Path:
        return record_path(self.real, rebuild_id, "disk.xml")


class DiskActivities:
    def __init__(
        self, libvirt_conn: ld.Libvirt, state: StateDir, checkpoints: Checkpoints | None = None
    ) -> None:
        self.libvirt = libvirt_conn
        self.state = state
        self.checkpoints = checkpoints or Checkpoints()

    async def _root_file(
        self,
        instance: str,
        target: str | None,
        *,
        stopped: bool = True,
        check_discarding: bool | None = None,
    ) -> _RootFile:
        """The root disk; with ``check_discarding`` set, refused where a rebuild may not replace it
        (snapshots allowed when it is True)."""

        domain = self.libvirt.domain(instance)

        def read() -> _RootFile:
            if stopped and domain.is_active():
                raise InstanceNotStopped(f"instance {instance!r} is running; its disk stays")
            xml = domain.definition()
            disk = dx.step_root_disk(xml, instance, target)
            if check_discarding is not None:
                rebuildable.refuse_unrebuildable(domain, disk, check_discarding)
            return _RootFile(xml, disk, os.path.realpath(disk.path))

        return await asyncio.to_thread(read)

    async def _define_disk(self, instance: str, root: _RootFile, disk: ET.Element) -> None:
        if not dx.same(dx.disk_element(root.xml, root.disk.target), disk):
            await asyncio.to_thread(self.libvirt.domain(instance).update_disk, root.xml, disk)

    @activity.defn
    async def prepare_root_disk(self, request: PrepareRootDiskInput) -> PreparedRootDisk:
        """Keep the old disk as a backup, put a qcow2 overlay on the cached image in its place."""
        _validate_prepare(request)
        base = self.state.image_path(request.image_sha256)
        async with keep_alive():
            first = not backup_path(await self._real_path(request), request.rebuild_id).exists()
            # The first attempt asks again what inspect asked: snapshots or a saved state may have
            # appeared while the instance stopped. A retry finds its own backup and finishes.
            root = await self._root_file(
                request.instance,
                request.root_disk_target,
                check_discarding=request.discard_snapshots if first else None,
            )
            backup = backup_path(root.real, request.rebuild_id)
            fresh = new_disk_path(root.real, request.rebuild_id)
            recorded = original_format_path(root.real, request.rebuild_id)
            directory = Path(root.real).parent
            if not backup.exists():
                if not Path(root.real).exists():
                    raise DiskMissing(f"root disk {root.disk.path} of {request.instance!r} does not exist")
                # The old disk's definition comes from libvirt, before anything changes it, and is
                # what restore trusts: never a request's word (a guest can write a qcow2 header
                # naming any host file into its raw disk; opening that as qcow2 would follow it).
                write_atomically(recorded, root.disk.format)
                write_atomically(root.record(request.rebuild_id), dx.to_string(_element(root)))
                if request.discard_snapshots:
                    names = await asyncio.to_thread(self.libvirt.domain(request.instance).snapshot_names)
                    write_atomically(
                        record_path(root.real, request.rebuild_id, "snapshots.json"), json.dumps(names)
                    )
                await asyncio.to_thread(_keep_as_backup, root.real, backup)
            await self.checkpoints.reach("prepare.after-backup")
            original_format = _recorded_format(recorded, request.original_format)
            old = await qemu_img.image_info(str(backup), original_format)
            size = max(int(old["virtual-size"]), request.image_virtual_size, request.min_virtual_size)
            fresh.unlink(missing_ok=True)
            try:
                await qemu_img.create_overlay(str(fresh), str(base), request.image_format, size)
            except OSError as err:
                if err.errno == errno.ENOSPC:
                    raise HostOutOfSpace(f"no space for the new root disk in {directory}") from None
                raise
            _copy_ownership(backup, fresh)
            await self.checkpoints.reach("prepare.before-swap")
            os.replace(fresh, root.real)
            await asyncio.to_thread(fsync_dir, directory)
            original = _recorded_disk(root, request.rebuild_id)
            await self._define_disk(
                request.instance, root, dx.rebuilt_disk(original, str(base), request.image_format)
            )
            await self.checkpoints.reach("prepare.after-new-disk")
            return PreparedRootDisk(disk_path=root.disk.path, backup_path=str(backup), virtual_size=size)

    async def _real_path(self, request: PrepareRootDiskInput) -> str:
        root = await self._root_file(request.instance, request.root_disk_target, stopped=False)
        return root.real

    @activity.defn
    async def restore_root_disk(self, request: RestoreRootDiskInput) -> None:
        """Put the backup back, and the old disk's definition with it. A disk already restored, or
        never replaced, is a success.

        Without a backup, a disk that is an overlay on our image cache is a new disk whose old one is
        somewhere else (a backup under another rebuild ID): refusing is the only safe answer, because
        calling that "restored" would lose the old disk and leave the instance on the new one.
        """
        async with keep_alive():
            root = await self._root_file(request.instance, request.root_disk_target)
            backup = backup_path(root.real, request.rebuild_id)
            recorded = original_format_path(root.real, request.rebuild_id)
            if not backup.exists():
                self._refuse_if_new_disk(request, root.real, backup)
            if not backup.exists() and not recorded.exists():
                # Nothing of this rebuild is here to put back: the definition is left alone, since
                # a format from the request alone could make QEMU read a raw disk as qcow2.
                new_disk_path(root.real, request.rebuild_id).unlink(missing_ok=True)
                return
            original_format = _recorded_format(recorded, request.original_format)
            await self.checkpoints.reach("restore.before-swap")
            if backup.exists():
                if Path(root.real).exists() and os.path.samefile(backup, root.real):
                    backup.unlink()
                else:
                    os.replace(backup, root.real)
                await asyncio.to_thread(fsync_dir, Path(root.real).parent)
            new_disk_path(root.real, request.rebuild_id).unlink(missing_ok=True)
            if root.record(request.rebuild_id).exists():
                original = _recorded_disk(root, request.rebuild_id)
            else:
                # Prepared by a worker from before the whole element was recorded: its format only.
                original = dx.with_format(_element(root), original_format)
            await self._define_disk(request.instance, root, original)
            for record in (recorded, root.record(request.rebuild_id)):
                record.unlink(missing_ok=True)
            record_path(root.real, request.rebuild_id, "snapshots.json").unlink(missing_ok=True)

    def _refuse_if_new_disk(self, request: RestoreRootDiskInput, disk: str, backup: Path) -> None:
        backing = qcow2.read_header(Path(disk))
        if backing is None or not backing.backing_file:
            return
        resolved = (Path(disk).parent / backing.backing_file).resolve()
        if resolved.parent != self.state.images.resolve():
            return
        # An instance rebuilt before already runs on an overlay: unless it is on this rebuild's image,
        # that is its old disk, never replaced (prepare stopped before it made the backup).
        was_overlay = request.original_format == "qcow2"
        if was_overlay and request.image_sha256 is not None and resolved.name != request.image_sha256:
            return
        others = sorted(str(p) for p in Path(disk).parent.glob(f"{Path(disk).name}.rebuild-*.backup"))
        raise DiskMissing(
            f"cannot restore {request.instance!r}: no backup at {backup}, and the root disk {disk} is a "
            f"new disk (an overlay on the cached image {resolved}); backups found next to it: "
            f"{', '.join(others) or 'none'}"
        )

    @activity.defn
    async def remove_backup(self, request: RemoveBackupInput) -> None:
        """The rebuild is kept: the old disk goes, and with --discard-snapshots its snapshots' metadata
        (first, so that a crash in between never leaves snapshots whose disk is gone unannounced)."""
        root = await self._root_file(request.instance, request.root_disk_target, stopped=False)
        snapshots = record_path(root.real, request.rebuild_id, "snapshots.json")
        if snapshots.exists():
            names = [str(n) for n in json.loads(snapshots.read_text())]
            await asyncio.to_thread(self.libvirt.domain(request.instance).drop_snapshot_metadata, names)
        backup_path(root.real, request.rebuild_id).unlink(missing_ok=True)
        for path in (
            new_disk_path(root.real, request.rebuild_id),
            original_format_path(root.real, request.rebuild_id),
            root.record(request.rebuild_id),
            snapshots,
        ):
            path.unlink(missing_ok=True)


def _element(root: _RootFile) -> ET.Element:
    return dx.disk_element(root.xml, root.disk.target)


def _recorded_disk(root: _RootFile, rebuild_id: str) -> ET.Element:
    """The old ``<disk>`` as prepare recorded it; the definition's own where no record was made."""
    try:
        return dx.parse(root.record(rebuild_id).read_text())
    except FileNotFoundError:
        return _element(root)


def _recorded_format(recorded: Path, requested: str) -> str:
    """The old disk's format as prepare recorded it from libvirt; the request's only if none was.

    Without a record nothing was replaced by this rebuild (or it predates the record), and the
    request's word may only say raw or qcow2.
    """
    try:
        return recorded.read_text().strip()
    except FileNotFoundError:
        if requested not in DISK_FORMATS:
            raise InvalidRequest(f"original format must be raw or qcow2, not {requested[:40]!r}") from None
        return requested


def _keep_as_backup(disk: str, backup: Path) -> None:
    """A hard link keeps the old disk without a moment where the disk path is empty."""
    try:
        os.link(disk, backup)
    except OSError as err:
        if err.errno not in (errno.EPERM, errno.EXDEV, errno.ENOTSUP, errno.EMLINK):
            raise
        # A filesystem without hard links: a rename still never loses the old disk.
        os.rename(disk, backup)
    fsync_dir(backup.parent)


def _copy_ownership(reference: Path, target: Path) -> None:
    stat = reference.stat()
    os.chown(target, stat.st_uid, stat.st_gid)
    os.chmod(target, stat.st_mode & 0o7777)
