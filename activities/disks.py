"""Activities that change root disk files: prepare the new one, restore the old one, drop the backup.

The invariant these keep: at every instant the root disk path holds either the old disk or the new
one. The old disk is kept as a hard link (a second name for the same file, made in constant time), and
the new disk replaces the path by an atomic rename; nothing is ever copied.
"""

from __future__ import annotations

import asyncio
import errno
import os
import struct
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from temporalio import activity

from activities import libvirt_domain as ld
from activities import qemu_img
from activities.checkpoints import Checkpoints
from activities.errors import DiskMissing, HostOutOfSpace, ImageTooLarge, InstanceNotStopped, InvalidRequest
from activities.heartbeat import keep_alive
from activities.state import StateDir, backup_path, fsync_dir, new_disk_path, original_format_path
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


class DiskActivities:
    def __init__(
        self, libvirt_conn: ld.Libvirt, state: StateDir, checkpoints: Checkpoints | None = None
    ) -> None:
        self.libvirt = libvirt_conn
        self.state = state
        self.checkpoints = checkpoints or Checkpoints()

    async def _stopped_root_disk(self, instance: str) -> tuple[ET.Element, ld.RootDisk]:
        def read(domain: Any) -> tuple[ET.Element, ld.RootDisk]:
            if ld.is_active(domain):
                raise InstanceNotStopped(f"instance {instance!r} is running; its disk stays")
            xml = ld.inactive_xml(domain)
            return xml, ld.root_disk(xml, instance)

        return await asyncio.to_thread(self.libvirt.with_domain, instance, read)

    async def _set_format(self, instance: str, xml: ET.Element, disk: ld.RootDisk, fmt: str) -> None:
        if disk.format != fmt:
            definition = ld.with_root_disk_format(xml, disk.target, fmt)
            await asyncio.to_thread(self.libvirt.define, instance, definition)

    @activity.defn
    async def prepare_root_disk(self, request: PrepareRootDiskInput) -> PreparedRootDisk:
        """Keep the old disk as a backup, put a qcow2 overlay on the cached image in its place."""
        _validate_prepare(request)
        base = self.state.image_path(request.image_sha256)
        async with keep_alive():
            xml, disk = await self._stopped_root_disk(request.instance)
            backup = backup_path(disk.path, request.rebuild_id)
            fresh = new_disk_path(disk.path, request.rebuild_id)
            recorded = original_format_path(disk.path, request.rebuild_id)
            directory = Path(disk.path).parent
            if not backup.exists():
                if not Path(disk.path).exists():
                    raise DiskMissing(f"root disk {disk.path} of {request.instance!r} does not exist")
                # The old format comes from libvirt's definition, before anything changes it, and
                # is what restore trusts: never a request's word (a guest can write a qcow2 header
                # naming any host file into its raw disk; opening that as qcow2 would follow it).
                _write_small(recorded, disk.format)
                await asyncio.to_thread(_keep_as_backup, disk.path, backup)
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
            os.replace(fresh, disk.path)
            await asyncio.to_thread(fsync_dir, directory)
            await self._set_format(request.instance, xml, disk, "qcow2")
            await self.checkpoints.reach("prepare.after-new-disk")
            return PreparedRootDisk(disk_path=disk.path, backup_path=str(backup), virtual_size=size)

    @activity.defn
    async def restore_root_disk(self, request: RestoreRootDiskInput) -> None:
        """Put the backup back. A disk already restored, or never replaced, is a success.

        Without a backup, a disk that is an overlay on our image cache is a new disk whose old one is
        somewhere else (a backup under another rebuild ID): refusing is the only safe answer, because
        calling that "restored" would lose the old disk and leave the instance on the new one.
        """
        async with keep_alive():
            xml, disk = await self._stopped_root_disk(request.instance)
            backup = backup_path(disk.path, request.rebuild_id)
            recorded = original_format_path(disk.path, request.rebuild_id)
            if not backup.exists():
                self._refuse_if_new_disk(request, disk.path, backup)
            if not backup.exists() and not recorded.exists():
                # Nothing of this rebuild is here to put back: the definition is left alone, since
                # a format from the request alone could make QEMU read a raw disk as qcow2.
                new_disk_path(disk.path, request.rebuild_id).unlink(missing_ok=True)
                return
            original_format = _recorded_format(recorded, request.original_format)
            await self.checkpoints.reach("restore.before-swap")
            if backup.exists():
                if Path(disk.path).exists() and os.path.samefile(backup, disk.path):
                    backup.unlink()
                else:
                    os.replace(backup, disk.path)
                await asyncio.to_thread(fsync_dir, Path(disk.path).parent)
            new_disk_path(disk.path, request.rebuild_id).unlink(missing_ok=True)
            await self._set_format(request.instance, xml, disk, original_format)
            original_format_path(disk.path, request.rebuild_id).unlink(missing_ok=True)

    def _refuse_if_new_disk(self, request: RestoreRootDiskInput, disk: str, backup: Path) -> None:
        backing = _qcow2_backing_file(Path(disk))
        if backing is None:
            return
        resolved = (Path(disk).parent / backing).resolve()
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
        def find(domain: Any) -> ld.RootDisk:
            return ld.root_disk(ld.inactive_xml(domain), request.instance)

        disk = await asyncio.to_thread(self.libvirt.with_domain, request.instance, find)
        backup_path(disk.path, request.rebuild_id).unlink(missing_ok=True)
        new_disk_path(disk.path, request.rebuild_id).unlink(missing_ok=True)
        original_format_path(disk.path, request.rebuild_id).unlink(missing_ok=True)


def _write_small(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


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


def _qcow2_backing_file(path: Path) -> str | None:
    """The backing file a qcow2 header names, read from the header itself (None for anything else)."""
    try:
        with open(path, "rb") as disk:
            header = disk.read(20)
            if len(header) < 20 or not header.startswith(b"QFI\xfb"):
                return None
            offset, size = struct.unpack(">QI", header[8:20])
            if offset == 0 or size == 0 or size > 1023:
                return None
            disk.seek(offset)
            return disk.read(size).decode(errors="replace")
    except FileNotFoundError:
        return None
