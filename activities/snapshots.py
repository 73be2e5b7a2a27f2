"""Snapshot activities: copy an instance's root disk at one point in time into the host's image cache.

A running instance is copied by libvirt's backup API (push mode) while it runs on: its file systems
are frozen through the guest agent only around the backup's begin, which fixes the point in time, and
thawed at once, on every path. A shut-off instance is copied by ``qemu-img convert``. Either way the
copy is written under ``snapshots/partial``, hashed, and renamed into the cache under its SHA-256; the
record, written last, is the snapshot. Every attempt starts by undoing what an earlier one left (a
frozen guest, a backup job still copying, a partial file), so a worker killed anywhere leaves either a
finished snapshot or none.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from temporalio import activity

from activities import domain_xml as dx
from activities import libvirt_domain as ld
from activities import libvirt_storage as st
from activities.cache import domain_image_users
from activities.checkpoints import Checkpoints
from activities.errors import (
    HostOutOfSpace,
    InstanceNotFound,
    InvalidRequest,
    QuiesceFailed,
    SnapshotFailed,
    SnapshotNotFound,
)
from activities.heartbeat import keep_alive
from activities.libvirt_backup import DomainBackup
from activities.qemu_img import CONVERT_SECONDS_LIMIT, image_info, run_qemu_img
from activities.snapshot_store import SnapshotStore
from activities.state import StateDir, fsync_dir, require_snapshot_id
from workflows.activity_models import CachedImage, ResolvedImage
from workflows.checks import check_instance_name
from workflows.snapshot_models import (
    Consistency,
    DiscardSnapshotInput,
    PruneSnapshotsInput,
    ResolveSnapshotInput,
    SnapshotCatalogRequest,
    SnapshotCatalogResult,
    SnapshotImage,
    SnapshotRecord,
    TakeSnapshotInput,
)

SNAPSHOT_FORMAT = "qcow2"
# Each agent call is bounded: the freeze window is at most this long, plus the backup's begin.
AGENT_TIMEOUT_SECONDS = 5
POLL_SECONDS = 0.05
# Room beyond the copy's own size a snapshot leaves in the state directory's file system.
SPACE_MARGIN_BYTES = 64 << 20
HASH_CHUNK = 4 << 20


@dataclass(frozen=True)
class _Source:
    """The root disk as the snapshot reads it."""

    domain: ld.Domain
    xml: object
    disk: dx.RootDisk
    path: str
    uuid: str
    running: bool
    has_agent: bool
    image_sha256: str | None
    every_disk: list[str]


def _validate(request: TakeSnapshotInput) -> None:
    """Anyone who reaches Temporal can call this: it checks its own input."""
    require_snapshot_id(request.snapshot_id)
    try:
        check_instance_name(request.instance)
    except ValueError as err:
        raise InvalidRequest(str(err)) from None
    if request.quiesce not in ("auto", "required", "off"):
        raise InvalidRequest(f"quiesce must be auto, required or off, not {str(request.quiesce)[:20]!r}")
    if request.label is not None and (len(request.label) > 200 or not request.label.isprintable()):
        raise InvalidRequest("a snapshot label is at most 200 printable characters")


class SnapshotActivities:
    def __init__(
        self, libvirt_conn: ld.Libvirt, state: StateDir, host: str, checkpoints: Checkpoints | None = None
    ) -> None:
        self.libvirt = libvirt_conn
        self.state = state
        self.host = host
        self.store = SnapshotStore(state)
        self.checkpoints = checkpoints or Checkpoints()

    @activity.defn
    async def take_snapshot(self, request: TakeSnapshotInput) -> SnapshotRecord:
        """The root disk at one point in time, into the cache; the instance is never stopped."""
        _validate(request)
        existing = self.store.find(request.snapshot_id)
        if existing is not None:
            return existing  # an earlier attempt finished, and its result was lost with its worker
        domain = self.libvirt.domain(request.instance)
        async with keep_alive():
            await self._discard(domain, request.snapshot_id)
            source = await asyncio.to_thread(self._read, domain)
            partial = self.state.snapshot_partial(request.snapshot_id)
            await self._refuse_without_space(source)
            try:
                if source.running:
                    consistency, frozen_ms = await self._back_up_running(source, partial, request.quiesce)
                else:
                    consistency, frozen_ms = await self._copy_stopped(source, partial), None
                await self.checkpoints.reach("snapshot.after-copy")
                sha256, size, virtual_size = await self._into_cache(partial)
            except BaseException:
                await asyncio.shield(self._discard(domain, request.snapshot_id))
                raise
        record = SnapshotRecord(
            snapshot_id=request.snapshot_id,
            instance=request.instance,
            instance_uuid=source.uuid,
            host=self.host,
            taken_at=datetime.now(UTC),
            label=request.label,
            sha256=sha256,
            format=SNAPSHOT_FORMAT,
            size=size,
            virtual_size=virtual_size,
            consistency=consistency,
            frozen_ms=frozen_ms,
            root_disk_target=source.disk.target,
            image_sha256=source.image_sha256,
        )
        self.store.save(record)
        return record

    @activity.defn
    async def discard_snapshot(self, request: DiscardSnapshotInput) -> None:
        """An unfinished snapshot's undo: the guest thawed, its backup job aborted, its partial gone."""
        require_snapshot_id(request.snapshot_id)
        await self._discard(self.libvirt.domain(request.instance), request.snapshot_id)

    @activity.defn
    async def resolve_snapshot(self, request: ResolveSnapshotInput) -> SnapshotImage:
        """A snapshot as a rebuild's image: already cached, so the rebuild skips fetch (check still runs)."""
        record = self.store.get(request.snapshot_id)
        path = self.state.image_path(record.sha256)
        os.utime(path)  # the cache's "last used"
        return SnapshotImage(
            record=record,
            source=ResolvedImage(
                url=f"snapshot:{record.snapshot_id}",
                sha256=record.sha256,
                disk_format="qcow2",
                size=record.size,
            ),
            cached=CachedImage(sha256=record.sha256, size=record.size, downloaded_bytes=0, cache_hit=True),
        )

    @activity.defn
    async def prune_snapshots(self, request: PruneSnapshotsInput) -> SnapshotCatalogResult:
        """Retention: the instance's ``keep`` newest snapshots stay, older ones go."""
        if not 1 <= request.keep <= 1000:
            raise InvalidRequest(f"keep must be 1 to 1000 snapshots, not {request.keep}")
        old = self.store.all(request.instance)[: -request.keep]
        deleted = await asyncio.to_thread(self._delete, [r.snapshot_id for r in old])
        return SnapshotCatalogResult(deleted=tuple(deleted))

    @activity.defn
    async def snapshot_catalog(self, request: SnapshotCatalogRequest) -> SnapshotCatalogResult:
        """List this host's snapshots, or delete some: an unknown ID is refused before any is deleted."""
        if request.action == "list":
            return SnapshotCatalogResult(
                snapshots=tuple(await asyncio.to_thread(self.store.all, request.instance))
            )
        ids = [require_snapshot_id(i) for i in request.snapshot_ids]
        missing = [i for i in ids if self.store.find(i) is None]
        if missing:
            raise SnapshotNotFound(f"no snapshot {', '.join(missing)} on host {self.host}")
        return SnapshotCatalogResult(deleted=tuple(await asyncio.to_thread(self._delete, ids)))

    # -- the copy --

    def _read(self, domain: ld.Domain) -> _Source:
        running = domain.is_active()
        xml = domain.live_definition() if running else domain.definition()
        disk = dx.root_disk(xml, domain.name)
        if disk.kind == "volume":
            pool, _, name = disk.path.partition("/")
            volume = st.Pool(self.libvirt, pool).volume(name)
            if volume is None:
                raise SnapshotFailed(f"instance {domain.name!r}: volume {disk.path} is gone")
            path = volume.path()
        elif disk.kind in ("file", "block"):
            path = disk.path
        else:
            raise InvalidRequest(
                f"instance {domain.name!r}: a {disk.kind} root disk cannot be snapshotted here"
            )
        record = domain.image_record()
        return _Source(
            domain=domain,
            xml=xml,
            disk=disk,
            path=path,
            uuid=domain.uuid(),
            running=running,
            has_agent=dx.has_agent_channel(xml),
            image_sha256=record.get("sha256") if record is not None else None,
            every_disk=dx.disk_targets(xml),
        )

    async def _refuse_without_space(self, source: _Source) -> None:
        """The copy holds at most the guest's data: the chain's allocation, never more than its size."""
        info = await image_info(source.path, source.disk.format)
        allocated = int(info.get("actual-size") or 0) or int(info["virtual-size"])
        backing = info.get("full-backing-filename")
        if backing:
            allocated += os.stat(backing).st_size if os.path.exists(backing) else 0
        need = min(allocated, int(info["virtual-size"])) + SPACE_MARGIN_BYTES
        fs = os.statvfs(self.state.snapshots)
        free = fs.f_bavail * fs.f_frsize
        if free < need:
            raise HostOutOfSpace(
                f"{self.state.snapshots} has {free >> 20} MiB free; a snapshot of {source.domain.name!r} "
                f"needs up to {need >> 20} MiB"
            )

    async def _back_up_running(
        self, source: _Source, partial: Path, quiesce: str
    ) -> tuple[Consistency, float | None]:
        backup = DomainBackup(source.domain)
        frozen = False
        frozen_mark = partial.with_suffix(".frozen")
        began = time.monotonic()
        if quiesce != "off" and source.has_agent:
            # Marked first: a worker killed from here on leaves the mark, and the next attempt thaws.
            frozen_mark.touch()
            frozen = await asyncio.to_thread(backup.freeze, AGENT_TIMEOUT_SECONDS)
            if not frozen:
                # An agent that answered too late may have frozen them after all: asked, and thawed.
                if await asyncio.to_thread(backup.freeze_status, AGENT_TIMEOUT_SECONDS) == "frozen":
                    await self._thaw(backup)
                frozen_mark.unlink()
        if quiesce == "required" and not frozen:
            why = (
                "its guest agent did not freeze its file systems"
                if source.has_agent
                else "it has no guest agent channel"
            )
            raise QuiesceFailed(f"instance {source.domain.name!r}: no quiesced snapshot: {why}")
        try:
            if frozen:
                await self.checkpoints.reach("snapshot.while-frozen")
            await asyncio.to_thread(
                backup.begin, str(partial), SNAPSHOT_FORMAT, source.disk.target, source.every_disk
            )
        finally:
            if frozen:
                await asyncio.shield(self._thaw(backup))
                frozen_mark.unlink()
        frozen_ms = (time.monotonic() - began) * 1000 if frozen else None
        await self._wait_for_copy(backup, source.domain.name)
        return ("quiesced" if frozen else "crash-consistent"), frozen_ms

    async def _thaw(self, backup: DomainBackup) -> None:
        """Thawed, whatever it takes: an agent that does not answer is asked again."""
        for _ in range(5):
            if await asyncio.to_thread(backup.thaw, AGENT_TIMEOUT_SECONDS):
                return
            await asyncio.sleep(1)
        raise SnapshotFailed(
            f"instance {backup.domain.name!r}: its guest agent did not thaw its file systems"
        )

    async def _wait_for_copy(self, backup: DomainBackup, instance: str) -> None:
        while (progress := await asyncio.to_thread(backup.progress)).running:
            activity.heartbeat(progress.processed, progress.total)
            await asyncio.sleep(POLL_SECONDS)
        failure = await asyncio.to_thread(backup.completed)
        if failure is not None:
            raise SnapshotFailed(f"instance {instance!r}: the backup job failed: {failure}")

    async def _copy_stopped(self, source: _Source, partial: Path) -> Consistency:
        await run_qemu_img(
            "convert", "-q", "-U", "-f", source.disk.format, "-O", SNAPSHOT_FORMAT, source.path, str(partial),
            wall_seconds=CONVERT_SECONDS_LIMIT, cpu_seconds=int(CONVERT_SECONDS_LIMIT),
        )  # fmt: skip
        return "shut-off"

    async def _into_cache(self, partial: Path) -> tuple[str, int, int]:
        """Hashed, then renamed into the cache under its digest (read-only, as every cached image)."""
        info = await image_info(str(partial), SNAPSHOT_FORMAT)
        if info.get("backing-filename"):
            raise SnapshotFailed(f"{partial} has a backing file: not a whole copy")
        sha256 = await asyncio.to_thread(_sha256_of, partial)
        target = self.state.image_path(sha256)
        os.chmod(partial, 0o444)
        size = partial.stat().st_size
        os.replace(partial, target)
        fsync_dir(target.parent)
        return sha256, size, int(info["virtual-size"])

    async def _discard(self, domain: ld.Domain, snapshot_id: str) -> None:
        """What an unfinished attempt left: a frozen guest, its backup job, its partial file."""
        partial = self.state.snapshot_partial(snapshot_id)
        frozen_mark = partial.with_suffix(".frozen")
        try:
            running = await asyncio.to_thread(domain.is_active)
        except InstanceNotFound:
            running = False
        backup = DomainBackup(domain)
        if running and frozen_mark.exists():
            await self._thaw(backup)
        frozen_mark.unlink(missing_ok=True)
        if running and await asyncio.to_thread(backup.running_target) == str(partial):
            await asyncio.to_thread(backup.abort)
        partial.unlink(missing_ok=True)

    def _delete(self, ids: list[str]) -> list[str]:
        in_use = set(domain_image_users(self.state, self.libvirt))
        return [i for i in ids if self.store.delete(i, in_use)]


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while block := file.read(HASH_CHUNK):
            digest.update(block)
    return digest.hexdigest()
