"""Activities that replace root disks: prepare the new one, restore the old one, drop the backup.

Each finds the root disk in the instance's definition (by the target inspect found) and hands it to the
back end for its kind (``activities/root_disks``); the invariant every back end keeps: at every instant
the instance has its old disk or its new one.
"""

from __future__ import annotations

import asyncio

from temporalio import activity

from activities import domain_xml as dx
from activities import libvirt_domain as ld
from activities import rebuildable
from activities.checkpoints import Checkpoints
from activities.errors import ImageTooLarge, InstanceNotStopped, InvalidRequest
from activities.heartbeat import keep_alive
from activities.root_disks import RootDiskAt, RootDiskBackend, RootDisks
from activities.root_disks.file_overlay import DISK_FORMATS
from activities.state import StateDir
from workflows import activity_models as io

# No request makes a root disk larger than this, whatever limit it names (qcow2's own limit is higher).
MAX_ROOT_DISK_BYTES = 64 << 40


def _validate_sizes(request: io.NewRootDisk) -> None:
    """Anyone who reaches Temporal can call stage and prepare: they check their own input."""
    if request.image_format not in DISK_FORMATS:
        raise InvalidRequest(f"image format must be raw or qcow2, not {request.image_format[:40]!r}")
    limit = min(request.max_virtual_size or MAX_ROOT_DISK_BYTES, MAX_ROOT_DISK_BYTES)
    for what, size in (("image", request.image_virtual_size), ("minimum disk", request.min_virtual_size)):
        if not 0 <= size <= limit:
            raise ImageTooLarge(f"{what} size {size} bytes is over the limit of {limit} bytes")


def _disk_mode(mode: str) -> str:
    if mode not in io.DISK_MODES:
        raise InvalidRequest(f"disk mode must be {' or '.join(io.DISK_MODES)}, not {str(mode)[:40]!r}")
    return mode


class DiskActivities:
    def __init__(
        self,
        libvirt_conn: ld.Libvirt,
        state: StateDir,
        checkpoints: Checkpoints | None = None,
        default_disk_mode: str = "overlay",
    ) -> None:
        self.libvirt = libvirt_conn
        self.state = state
        self.checkpoints = checkpoints or Checkpoints()
        self.root_disks = RootDisks(state, self.checkpoints)
        # How a file root disk's new disk is made where a request does not say (rebuild-worker --disk-mode).
        self.default_disk_mode = _disk_mode(default_disk_mode)

    def backend(self, root: RootDiskAt) -> RootDiskBackend:
        return self.root_disks.backend(root)

    async def _root(
        self,
        instance: str,
        target: str | None,
        *,
        stopped: bool = True,
        check_discarding: bool | None = None,
    ) -> RootDiskAt:
        """The root disk; with ``check_discarding`` set, refused where a rebuild may not replace it
        (snapshots allowed when it is True)."""
        domain = self.libvirt.domain(instance)

        def read() -> RootDiskAt:
            if stopped and domain.is_active():
                raise InstanceNotStopped(f"instance {instance!r} is running; its disk stays")
            xml = domain.definition()
            root = RootDiskAt(domain, xml, dx.step_root_disk(xml, instance, target))
            if check_discarding is not None:
                rebuildable.refuse_unrebuildable(root, check_discarding)
            return root

        return await asyncio.to_thread(read)

    @activity.defn
    async def stage_root_disk(self, request: io.StageRootDiskInput) -> io.StagedRootDisk:
        """The new disk, written while the instance still runs: the downtime keeps only the swap."""
        _validate_sizes(request)
        mode = _disk_mode(request.disk_mode or self.default_disk_mode)
        request = request.model_copy(update={"disk_mode": mode})
        async with keep_alive():
            root = await self._root(request.instance, request.root_disk_target, stopped=False)
            staged = await self.backend(root).stage(root, request)
            # Kill points every back end has (tests pause a worker here, then kill it).
            await self.checkpoints.reach("stage.after-write")
            return staged

    @activity.defn
    async def plan_root_disk(self, request: io.PlanRootDiskInput) -> io.PlannedRootDisk:
        """A dry run's stage: every refusal stage and prepare would make, and how the back end would
        make the new disk; nothing is written."""
        _validate_sizes(request)
        mode = _disk_mode(request.disk_mode or self.default_disk_mode)
        request = request.model_copy(update={"disk_mode": mode})
        root = await self._root(
            request.instance,
            request.root_disk_target,
            stopped=False,
            check_discarding=request.discard_snapshots,
        )
        return await self.backend(root).plan(root, request)

    @activity.defn
    async def discard_staged_root_disk(self, request: io.DiscardStagedRootDiskInput) -> None:
        """Stage's undo; a disk already swapped in is prepare's, and restore's, to handle."""
        root = await self._root(request.instance, request.root_disk_target, stopped=False)
        await self.backend(root).discard_staged(root, request)

    @activity.defn
    async def prepare_root_disk(self, request: io.PrepareRootDiskInput) -> io.PreparedRootDisk:
        """Keep the old disk as a backup and put the new one in its place (see the back end)."""
        _validate_sizes(request)
        async with keep_alive():
            # The first attempt asks again what inspect asked: snapshots or a saved state may have
            # appeared while the instance stopped. A retry finds its own backup and finishes. One
            # read of the definition for both: this runs inside the downtime.
            root = await self._root(request.instance, request.root_disk_target)
            if not self.backend(root).began(root, request.rebuild_id):
                await asyncio.to_thread(rebuildable.refuse_unrebuildable, root, request.discard_snapshots)
            return await self.backend(root).prepare(root, request)

    @activity.defn
    async def restore_root_disk(self, request: io.RestoreRootDiskInput) -> None:
        """Put the old disk and its definition back; a disk already restored, or never replaced, is fine."""
        async with keep_alive():
            root = await self._root(request.instance, request.root_disk_target)
            await self.backend(root).restore(root, request)

    @activity.defn
    async def remove_backup(self, request: io.RemoveBackupInput) -> None:
        """The rebuild is kept: the old disk goes, with what was kept beside it."""
        async with keep_alive():
            root = await self._root(request.instance, request.root_disk_target, stopped=False)
            await self.checkpoints.reach("cleanup.before-remove")
            await self.backend(root).remove_backup(root, request)
