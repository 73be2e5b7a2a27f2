"""What a root-disk back end is: the interface, and the root disk as a step finds it.

``DiskActivities`` finds the root disk in the definition and hands it to the back end for its kind;
the workflow knows none of them. A back end keeps the rebuild's promise for its kind: at every instant
the instance has its old disk or its new one, the old one is kept until cleanup, and every call can run
again after a crash at any line and end in the same state.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Protocol

from activities import domain_xml as dx
from activities import libvirt_domain as ld
from workflows import activity_models as io


@dataclass(frozen=True)
class RootDiskAt:
    """The root disk as a step finds it: its domain, the definition it was read from, and the disk."""

    domain: ld.Domain
    xml: ET.Element
    disk: dx.RootDisk

    @property
    def element(self) -> ET.Element:
        return dx.disk_element(self.xml, self.disk.target)


def planned_disk(root: RootDiskAt, virtual_size: int, new_virtual_size: int, mode: str) -> io.PlannedRootDisk:
    """What a back end's ``plan`` answers: the root disk as it is, and the new disk it would make."""
    disk = root.disk
    return io.PlannedRootDisk(
        target=disk.target,
        path=disk.path,
        kind=disk.kind,
        format=disk.format,
        virtual_size=virtual_size,
        new_virtual_size=new_virtual_size,
        mode=mode,
    )


DISCARD = "pass --discard-snapshots (they stay until the rebuild is kept, so a rollback brings them back)"


class RootDiskBackend(Protocol):
    """What the disk activities ask of one kind of root disk."""

    @staticmethod
    def refuse_unsupported(root: RootDiskAt, discard_snapshots: bool) -> None:
        """Refuse, with its reason, a disk of this kind that a rebuild could not replace faithfully.
        Asked while the instance runs (inspect) and again before the swap (prepare); blocking."""

    @staticmethod
    async def virtual_size(root: RootDiskAt) -> int:
        """The root disk's size as the guest sees it (the new disk is at least as large)."""

    async def plan(self, root: RootDiskAt, request: io.PlanRootDiskInput) -> io.PlannedRootDisk:
        """A dry run: how stage would make the new disk, refusing what stage would; writes nothing."""

    async def stage(self, root: RootDiskAt, request: io.StageRootDiskInput) -> io.StagedRootDisk:
        """The instance still runs: write the new disk beside the old one, never in its place."""

    async def discard_staged(self, root: RootDiskAt, request: io.DiscardStagedRootDiskInput) -> None:
        """Stage's undo: the staged disk goes, unless it took the old one's place already."""

    async def running_on_new_disk(self, root: RootDiskAt, request: io.VerifyInstanceInput) -> str:
        """``root`` read from the running domain's live definition: is the disk QEMU opened the new one?
        What proves it, in words; ``BootCheckFailed`` where it is not."""

    def began(self, root: RootDiskAt, rebuild_id: str) -> bool:
        """Whether an attempt of this rebuild's prepare already kept the old disk (a retry finishes it)."""

    async def prepare(self, root: RootDiskAt, request: io.PrepareRootDiskInput) -> io.PreparedRootDisk:
        """The instance is off: keep the old disk, put the new one in its place, define it."""

    async def restore(self, root: RootDiskAt, request: io.RestoreRootDiskInput) -> None:
        """The instance is off: put the old disk and its definition back. Nothing to restore is fine."""

    async def remove_backup(self, root: RootDiskAt, request: io.RemoveBackupInput) -> None:
        """The rebuild is kept: the old disk, and what was kept with it, goes."""
