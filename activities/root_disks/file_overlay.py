"""Root disks that are files: a new file takes the old file's place, in one of two modes.

- overlay: a qcow2 overlay on the cached image (constant time, whatever the image's size); a raw disk
  becomes a qcow2 one that depends on the cache.
- copy: a standalone file in the old disk's own format (raw stays raw, a qcow2 disk gets a qcow2 file
  without a backing file): a reflink of the cached image where its file system shares extents (XFS
  with reflink, btrfs) and the image is in that format already, else a full copy by qemu-img; written
  by stage, while the instance still runs.

The invariant: at every instant the root disk's file holds either the old disk or the new one. The old
disk is kept as a hard link (a second name for the same file, made in constant time), the new disk
replaces the file by an atomic rename, and the old disk is never copied. Everything lies beside the file
the definition names, through any symlink: backups, the new disk before its rename, the records.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import json
import os
import stat
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass
from pathlib import Path

from activities import domain_xml as dx
from activities import qcow2, qemu_img
from activities.checkpoints import Checkpoints
from activities.errors import (
    BootCheckFailed,
    DiskMissing,
    HostOutOfSpace,
    InvalidRequest,
    UnsupportedInstance,
)
from activities.root_disks.base import DISCARD, RootDiskAt, planned_disk
from activities.state import (
    StateDir,
    backup_path,
    fsync_dir,
    new_disk_path,
    original_format_path,
    record_path,
    write_atomically,
)
from workflows import activity_models as io

DISK_FORMATS = ("raw", "qcow2")
# The new disk's qcow2 metadata and the records next to it need little; a disk with less than this
# free would fail after the stop.
MIN_FREE_BYTES = 64 << 20
# ioctl(2) FICLONE: the new file shares the image's extents, copied on write (XFS with reflink, btrfs).
FICLONE = 0x40049409
# What FICLONE answers where it cannot share: another file system, or one without reflinks.
_NO_REFLINK = (errno.EXDEV, errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL, errno.ENOSYS)


def real_path(root: RootDiskAt) -> str:
    """The definition's path with symlinks resolved: the swap replaces the file, never the link."""
    return os.path.realpath(root.disk.path)


def _disk_record(root: RootDiskAt, rebuild_id: str) -> Path:
    return record_path(real_path(root), rebuild_id, "disk.xml")


@dataclass(frozen=True)
class StagedCopy:
    """How stage made a standalone copy (``copy.json`` beside the disk, written once the copy was
    whole): prepare, verify and restore trust it, never a request's word."""

    # reflink or full.
    how: str
    format: str
    # (st_dev, st_ino) of the copy, whatever its name is now (the staged one, or the disk's).
    file: tuple[int, int]

    @property
    def mode(self) -> str:
        return f"copy ({self.how})"

    def names(self, path: Path) -> bool:
        """``path`` is this copy (renamed, or not yet)."""
        try:
            return _identity(path) == self.file
        except FileNotFoundError:
            return False


def _identity(path: Path) -> tuple[int, int]:
    info = path.stat()
    return info.st_dev, info.st_ino


def _copy_record(real: str, rebuild_id: str) -> Path:
    return record_path(real, rebuild_id, "copy.json")


def _staged_copy(real: str, rebuild_id: str) -> StagedCopy | None:
    try:
        made = json.loads(_copy_record(real, rebuild_id).read_text())
    except FileNotFoundError:
        return None
    return StagedCopy(str(made["how"]), str(made["format"]), (int(made["file"][0]), int(made["file"][1])))


class FileOverlay:
    def __init__(self, state: StateDir, checkpoints: Checkpoints) -> None:
        self.state = state
        self.checkpoints = checkpoints

    @staticmethod
    def refuse_unsupported(root: RootDiskAt, discard_snapshots: bool) -> None:
        _refuse_unusable_file(root.domain.name, root.disk, discard_snapshots)
        _refuse_shared_file(root, root.disk)

    @staticmethod
    async def virtual_size(root: RootDiskAt) -> int:
        return await _virtual_size(Path(real_path(root)), root.disk.format)

    async def running_on_new_disk(self, root: RootDiskAt, request: io.VerifyInstanceInput) -> str:
        assert request.image_sha256 is not None
        made = _staged_copy(real_path(root), request.rebuild_id) if request.rebuild_id else None
        if made is not None:
            return await asyncio.to_thread(standalone_copy, root, made, request.image_sha256)
        return await asyncio.to_thread(overlay_on_image, root, request.image_sha256)

    def began(self, root: RootDiskAt, rebuild_id: str) -> bool:
        return backup_path(real_path(root), rebuild_id).exists()

    async def _define(self, root: RootDiskAt, disk: ET.Element) -> None:
        if not dx.same(root.element, disk):
            await asyncio.to_thread(root.domain.update_disk, root.xml, disk)

    async def prepare(self, root: RootDiskAt, request: io.PrepareRootDiskInput) -> io.PreparedRootDisk:
        """Keep the old disk as a backup, put the staged disk in its place: the standalone copy where
        stage made one, else a qcow2 overlay on the cached image."""
        base = self.state.image_path(request.image_sha256)
        real = real_path(root)
        backup = backup_path(real, request.rebuild_id)
        fresh = new_disk_path(real, request.rebuild_id)
        recorded = original_format_path(real, request.rebuild_id)
        directory = Path(real).parent
        if not backup.exists():
            if not Path(real).exists():
                raise DiskMissing(f"root disk {root.disk.path} of {request.instance!r} does not exist")
            # The old disk's definition comes from libvirt, before anything changes it, and is
            # what restore trusts: never a request's word (a guest can write a qcow2 header
            # naming any host file into its raw disk; opening that as qcow2 would follow it).
            write_atomically(recorded, root.disk.format)
            write_atomically(_disk_record(root, request.rebuild_id), dx.to_string(root.element))
            if request.discard_snapshots:
                names = await asyncio.to_thread(root.domain.snapshot_names)
                write_atomically(record_path(real, request.rebuild_id, "snapshots.json"), json.dumps(names))
            await asyncio.to_thread(_keep_as_backup, real, backup)
        await self.checkpoints.reach("prepare.after-backup")
        original_format = _recorded_format(recorded, request.original_format)
        size = max(
            await _virtual_size(backup, original_format), request.image_virtual_size, request.min_virtual_size
        )
        made = _staged_copy(real, request.rebuild_id)
        # An attempt that died after the swap left the copy in place: it is not made again.
        if made is None or not made.names(Path(real)):
            # Staged while the instance ran (the usual case): only a disk that grew since needs a new one.
            if made is not None:
                made = await self._copy(real, original_format, request, size)
            elif not _is_overlay(fresh, base, size):
                await _create_overlay(fresh, base, request.image_format, size)
            _copy_ownership(backup, fresh)
            await self.checkpoints.reach("prepare.before-swap")
            os.replace(fresh, real)
            await asyncio.to_thread(fsync_dir, directory)
        original = _recorded_disk(root, request.rebuild_id)
        if made is not None:
            disk = dx.standalone_disk(original, made.format)
        else:
            disk = dx.rebuilt_disk(original, str(base), request.image_format)
        await self._define(root, disk)
        await self.checkpoints.reach("prepare.after-new-disk")
        return io.PreparedRootDisk(disk_path=root.disk.path, backup_path=str(backup), virtual_size=size)

    async def plan(self, root: RootDiskAt, request: io.PlanRootDiskInput) -> io.PlannedRootDisk:
        """Stage's choice without its writing: an overlay, or a copy (a reflink only where the file
        system shares extents, which is known once it is tried; a full copy must fit)."""
        current = await self.virtual_size(root)
        size = max(current, request.image_virtual_size, request.min_virtual_size)
        mode = "overlay"
        if request.disk_mode == "copy":
            base = self.state.image_path(request.image_sha256)
            if request.image_format == root.disk.format:
                mode = "copy (reflink where the file system shares extents, else full)"
            else:
                _refuse_no_room(base, Path(real_path(root)).parent)
                mode = "copy (full)"
        return planned_disk(root, current, size, mode)

    async def stage(self, root: RootDiskAt, request: io.StageRootDiskInput) -> io.StagedRootDisk:
        """The new disk, written beside the old one while the instance runs, as large as the old disk
        at least: a qcow2 overlay on the cached image, or in copy mode a standalone copy of the image
        in the old disk's format. A retry finds it and keeps it."""
        base = self.state.image_path(request.image_sha256)
        real = real_path(root)
        fresh = new_disk_path(real, request.rebuild_id)
        size = max(await self.virtual_size(root), request.image_virtual_size, request.min_virtual_size)
        mode = "overlay"
        if request.disk_mode == "copy":
            mode = (await self._copy(real, root.disk.format, request, size)).mode
        elif not _is_overlay(fresh, base, size):
            await _create_overlay(fresh, base, request.image_format, size)
        _copy_ownership(Path(real), fresh)
        return io.StagedRootDisk(staged_at=str(fresh), virtual_size=size, mode=mode)

    async def _copy(self, real: str, fmt: str, request: io.NewRootDisk, size: int) -> StagedCopy:
        """The staged standalone copy in ``fmt``, at least ``size`` bytes: the one a former attempt
        recorded where it is still whole and large enough, else a new one (recorded once whole)."""
        fresh = new_disk_path(real, request.rebuild_id)
        made = _staged_copy(real, request.rebuild_id)
        kept = made is not None and made.format == fmt and made.names(fresh)
        if made is not None and kept and await _virtual_size(fresh, fmt) >= size:
            return made
        base = self.state.image_path(request.image_sha256)
        how = await _create_copy(fresh, base, request.image_format, fmt, size)
        made = StagedCopy(how, fmt, _identity(fresh))
        write_atomically(_copy_record(real, request.rebuild_id), json.dumps(asdict(made)))
        return made

    async def discard_staged(self, root: RootDiskAt, request: io.DiscardStagedRootDiskInput) -> None:
        """The staged disk goes; once prepare renamed it into place it has no name of its own left."""
        _drop_new_disk(real_path(root), request.rebuild_id)

    async def restore(self, root: RootDiskAt, request: io.RestoreRootDiskInput) -> None:
        """Put the backup back, and the old disk's definition with it. A disk already restored, or
        never replaced, is a success.

        Without a backup, a disk that is an overlay on our image cache is a new disk whose old one is
        somewhere else (a backup under another rebuild ID): refusing is the only safe answer, because
        calling that "restored" would lose the old disk and leave the instance on the new one.
        """
        real = real_path(root)
        backup = backup_path(real, request.rebuild_id)
        recorded = original_format_path(real, request.rebuild_id)
        if not backup.exists():
            self._refuse_if_new_disk(request, real, backup)
        if not backup.exists() and not recorded.exists():
            # Nothing of this rebuild is here to put back: the definition is left alone, since
            # a format from the request alone could make QEMU read a raw disk as qcow2.
            _drop_new_disk(real, request.rebuild_id)
            return
        original_format = _recorded_format(recorded, request.original_format)
        await self.checkpoints.reach("restore.before-swap")
        if backup.exists():
            if Path(real).exists() and os.path.samefile(backup, real):
                backup.unlink()
            else:
                os.replace(backup, real)
            await asyncio.to_thread(fsync_dir, Path(real).parent)
        _drop_new_disk(real, request.rebuild_id)
        if _disk_record(root, request.rebuild_id).exists():
            original = _recorded_disk(root, request.rebuild_id)
        else:
            # Prepared by a worker from before the whole element was recorded: its format only.
            original = dx.with_format(root.element, original_format)
        await self._define(root, original)
        for record in (recorded, _disk_record(root, request.rebuild_id)):
            record.unlink(missing_ok=True)
        record_path(real, request.rebuild_id, "snapshots.json").unlink(missing_ok=True)

    def _refuse_if_new_disk(self, request: io.RestoreRootDiskInput, disk: str, backup: Path) -> None:
        new = self._new_disk_at(request, disk)
        if new is None:
            return
        others = sorted(str(p) for p in Path(disk).parent.glob(f"{Path(disk).name}.rebuild-*.backup"))
        raise DiskMissing(
            f"cannot restore {request.instance!r}: no backup at {backup}, and the root disk {disk} is a "
            f"new disk ({new}); backups found next to it: {', '.join(others) or 'none'}"
        )

    def _new_disk_at(self, request: io.RestoreRootDiskInput, disk: str) -> str | None:
        """What makes the disk at ``disk`` a new one, in words; None where it may be the old one."""
        made = _staged_copy(disk, request.rebuild_id)
        if made is not None and made.names(Path(disk)):
            return "the standalone copy this rebuild made"
        backing = qcow2.read_header(Path(disk))
        if backing is None or not backing.backing_file:
            return None
        resolved = (Path(disk).parent / backing.backing_file).resolve()
        if resolved.parent != self.state.images.resolve():
            return None
        # An instance rebuilt before already runs on an overlay: unless it is on this rebuild's image,
        # that is its old disk, never replaced (prepare stopped before it made the backup).
        was_overlay = request.original_format == "qcow2"
        if was_overlay and request.image_sha256 is not None and resolved.name != request.image_sha256:
            return None
        return f"an overlay on the cached image {resolved}"

    async def remove_backup(self, root: RootDiskAt, request: io.RemoveBackupInput) -> None:
        """The old disk goes, and with --discard-snapshots its snapshots' metadata (first, so that a
        crash in between never leaves snapshots whose disk is gone unannounced)."""
        real = real_path(root)
        snapshots = record_path(real, request.rebuild_id, "snapshots.json")
        if snapshots.exists():
            names = [str(n) for n in json.loads(snapshots.read_text())]
            await asyncio.to_thread(root.domain.drop_snapshot_metadata, names)
        backup_path(real, request.rebuild_id).unlink(missing_ok=True)
        _drop_new_disk(real, request.rebuild_id)
        for path in (
            original_format_path(real, request.rebuild_id),
            _disk_record(root, request.rebuild_id),
            snapshots,
        ):
            path.unlink(missing_ok=True)


def overlay_on_image(root: RootDiskAt, sha256: str) -> str:
    """The running root disk (``root`` read from the live definition), as QEMU opened it, is an
    overlay on the image and nothing else: a definition that kept an old chain would run the old base,
    one that kept ``<backingStore/>`` an empty disk."""
    chain = dx.chain(root.element)
    base = chain[-1][0] if len(chain) == 2 else None
    if base is None or Path(base).name != sha256:
        layers = " on ".join(str(path) for path, _ in chain)
        raise BootCheckFailed(
            f"instance {root.domain.name!r} runs its root disk {root.disk.target} as {layers}, not as an "
            f"overlay on image {sha256[:12]}"
        )
    return f"root disk {root.disk.target} runs on image {sha256[:12]}"


def standalone_copy(root: RootDiskAt, made: StagedCopy, sha256: str) -> str:
    """The running root disk (``root`` read from the live definition), as QEMU opened it, is the
    standalone copy stage made: one layer in its format, no backing file, and the very file stage
    wrote (by its inode: a disk put back, or a copy made by another attempt, is another file)."""
    chain = dx.chain(root.element)
    real = Path(real_path(root))
    header = qcow2.read_header(real) if made.format == "qcow2" else None
    alone = len(chain) == 1 and chain[0][1] == made.format and not (header and header.backing_file)
    if not alone or not made.names(real):
        layers = " on ".join(str(path) for path, _ in chain)
        raise BootCheckFailed(
            f"instance {root.domain.name!r} runs its root disk {root.disk.target} as {layers}, not as the "
            f"standalone {made.format} copy of image {sha256[:12]} this rebuild made"
        )
    return f"root disk {root.disk.target} runs on a standalone {made.format} copy of image {sha256[:12]}"


def _drop_new_disk(real: str, rebuild_id: str) -> None:
    fresh = new_disk_path(real, rebuild_id)
    for path in (fresh, fresh.with_name(f"{fresh.name}.partial"), _copy_record(real, rebuild_id)):
        path.unlink(missing_ok=True)


async def _virtual_size(path: Path, fmt: str) -> int:
    """The disk's size as the guest sees it, from the file itself: no tool in the downtime window."""
    if fmt == "raw":
        return path.stat().st_size
    header = qcow2.read_header(path)
    if header is not None:
        return header.virtual_size
    return int((await qemu_img.image_info(str(path), fmt))["virtual-size"])


def _is_overlay(path: Path, base: Path, size: int) -> bool:
    """An overlay on ``base`` of at least ``size`` bytes (``_create_overlay`` names only whole ones)."""
    header = qcow2.read_header(path)
    return header is not None and header.backing_file == str(base) and header.virtual_size >= size


async def _create_overlay(path: Path, base: Path, fmt: str, size: int) -> None:
    """Written under a temporary name and renamed once qemu-img is done: a crash mid-write never
    leaves a half-made disk under the name the swap uses."""
    partial = path.with_name(f"{path.name}.partial")
    partial.unlink(missing_ok=True)
    try:
        await qemu_img.create_overlay(str(partial), str(base), fmt, size)
    except OSError as err:
        partial.unlink(missing_ok=True)
        if err.errno == errno.ENOSPC:
            raise HostOutOfSpace(f"no space for the new root disk in {path.parent}") from None
        raise
    os.replace(partial, path)


async def _create_copy(fresh: Path, base: Path, image_format: str, fmt: str, size: int) -> str:
    """The image as a standalone file in ``fmt`` at ``fresh``, grown to ``size``: a reflink where the
    image is in ``fmt`` already and on the same file system (constant time), else a full, sparse copy
    by qemu-img. Written under a temporary name, flushed, then renamed; which of the two it was."""
    partial = fresh.with_name(f"{fresh.name}.partial")
    partial.unlink(missing_ok=True)
    try:
        shared = image_format == fmt and await asyncio.to_thread(_reflink, base, partial)
        how = "reflink" if shared else "full"
        if not shared:
            _refuse_no_room(base, fresh.parent)
            await qemu_img.convert_into(str(base), image_format, str(partial), fmt, create=True)
        await _grow(partial, fmt, size)
        await asyncio.to_thread(_fsync, partial)
    except BaseException as err:
        # Cancelled or failed: a half-written copy (it may be large) never stays behind.
        partial.unlink(missing_ok=True)
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            raise HostOutOfSpace(f"no space for the new root disk in {fresh.parent}") from None
        raise
    os.replace(partial, fresh)
    await asyncio.to_thread(fsync_dir, fresh.parent)
    return how


def _reflink(source: Path, target: Path) -> bool:
    """``target``, a new file sharing all of ``source``'s extents; False where the file system cannot."""
    with open(source, "rb") as src, open(target, "wb") as dst:
        try:
            fcntl.ioctl(dst.fileno(), FICLONE, src.fileno())
        except OSError as err:
            if err.errno not in _NO_REFLINK:
                raise
            return False
    return True


def _refuse_no_room(image: Path, directory: Path) -> None:
    """A full copy needs about the image's allocated bytes; short of that it fails before the stop."""
    needed = image.stat().st_blocks * 512 + MIN_FREE_BYTES
    space = os.statvfs(directory)
    if space.f_bavail * space.f_frsize < needed:
        raise HostOutOfSpace(f"no space for a copy of the image in {directory}: it needs {needed} bytes")


async def _grow(path: Path, fmt: str, size: int) -> None:
    if await _virtual_size(path, fmt) >= size:
        return
    if fmt == "raw":
        os.truncate(path, size)
    else:
        await qemu_img.resize(str(path), fmt, size)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _recorded_disk(root: RootDiskAt, rebuild_id: str) -> ET.Element:
    """The old ``<disk>`` as prepare recorded it; the definition's own where no record was made."""
    try:
        return dx.parse(_disk_record(root, rebuild_id).read_text())
    except FileNotFoundError:
        return root.element


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
    info = reference.stat()
    os.chown(target, info.st_uid, info.st_gid)
    os.chmod(target, info.st_mode & 0o7777)


def _refuse_unusable_file(instance: str, disk: dx.RootDisk, discard_snapshots: bool) -> None:
    """The root disk is a regular file (a link to one is fine), in a directory the new disk fits in."""
    real = Path(os.path.realpath(disk.path))
    where = f"instance {instance!r}: root disk {disk.target} ({disk.path})"
    try:
        mode = os.stat(real).st_mode
    except FileNotFoundError:
        raise DiskMissing(f"{where} does not exist") from None
    if not stat.S_ISREG(mode):
        kind = "a block device" if stat.S_ISBLK(mode) else "not a regular file"
        raise UnsupportedInstance(f"{where} is {kind}; a file disk is rebuilt only where it is a file")
    directory = real.parent
    space = os.statvfs(directory)
    if space.f_flag & os.ST_RDONLY or not os.access(directory, os.W_OK):
        raise UnsupportedInstance(
            f"{where}: its directory {directory} is read-only, and the new disk and the backup go there"
        )
    if space.f_bavail * space.f_frsize < MIN_FREE_BYTES:
        raise HostOutOfSpace(
            f"{where}: {directory} has less than {MIN_FREE_BYTES >> 20} MiB free for the new disk"
        )
    if disk.format != "qcow2":
        return
    header = qcow2.read_header(real)
    if header is None:
        return
    if header.encrypted:
        raise UnsupportedInstance(f"{where} is an encrypted qcow2 file; a new disk would not be")
    if header.snapshot_count and not discard_snapshots:
        more = " ..." if header.snapshot_count > len(header.snapshots) else ""
        names = ", ".join(header.snapshots) + more
        raise UnsupportedInstance(
            f"{where} holds {header.snapshot_count} internal snapshot(s) ({names}); delete them "
            f"(qemu-img snapshot -d), or {DISCARD}"
        )


def _refuse_shared_file(root: RootDiskAt, disk: dx.RootDisk) -> None:
    """No other disk uses the root disk's file: as its own source, or anywhere in its backing chain.

    A linked clone (another domain's overlay on this file) would read the new disk's bytes as its base.
    """
    real = Path(os.path.realpath(disk.path))
    instance = root.domain.name
    for name, target, files in root.domain.libvirt.disk_users(skip=(instance, disk.target)):
        chain = [Path(os.path.realpath(f)) for f in files]
        if len(chain) == 1:
            chain += qcow2.backing_chain(chain[0])
        if real in chain:
            how = "uses it" if chain[0] == real else "has it in its backing chain"
            raise UnsupportedInstance(
                f"instance {instance!r}: root disk {disk.path} is shared: disk {target} of domain "
                f"{name!r} {how}"
            )
