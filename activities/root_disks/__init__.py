"""Root-disk back ends: how each kind of root disk is replaced, behind one interface.

``DiskActivities`` finds the root disk in the definition and hands it to the back end for its kind;
the workflow knows none of them. A back end keeps the rebuild's promise for its kind: at every instant
the instance has its old disk or its new one, the old one is kept until cleanup, and every call can run
again after a crash at any line and end in the same state.
"""

from __future__ import annotations

from activities.checkpoints import Checkpoints
from activities.errors import UnsupportedInstance
from activities.root_disks.base import DISCARD, RootDiskAt, RootDiskBackend
from activities.root_disks.file_overlay import FileOverlay
from activities.root_disks.rbd import RbdImage
from activities.root_disks.volume import PoolVolume
from activities.state import StateDir

__all__ = ["DISCARD", "RootDiskAt", "RootDiskBackend", "RootDisks"]


class RootDisks:
    """The back ends of one host, by the kind of disk they replace."""

    def __init__(self, state: StateDir, checkpoints: Checkpoints) -> None:
        self._backends = {kind: backend(state, checkpoints) for kind, backend in BACKENDS.items()}

    def backend(self, root: RootDiskAt) -> RootDiskBackend:
        return self._backends[_kind(root)]


Backend = type[FileOverlay] | type[PoolVolume] | type[RbdImage]
# The back end for each kind of root disk (the <disk type>): a block device is replaced as the pool
# volume it is; a network disk is an RBD image (domain_xml refuses other protocols).
BACKENDS: dict[str, Backend] = {
    "file": FileOverlay,
    "volume": PoolVolume,
    "block": PoolVolume,
    "network": RbdImage,
}


def _kind(root: RootDiskAt) -> str:
    """The root disk's kind, refused where no back end replaces it (with the kinds that are)."""
    if root.disk.kind not in BACKENDS:
        raise UnsupportedInstance(
            f"instance {root.domain.name!r}: root disk {root.disk.target} is of type {root.disk.kind!r}; "
            f"root disks of type {', '.join(BACKENDS)} can be rebuilt here"
        )
    return root.disk.kind


def _backend_class(root: RootDiskAt) -> Backend:
    return BACKENDS[_kind(root)]


async def virtual_size(root: RootDiskAt) -> int:
    """The root disk's size as the guest sees it, by its back end (pre-flight sizes its sandbox so)."""
    return await _backend_class(root).virtual_size(root)


def refuse_unsupported(root: RootDiskAt, discard_snapshots: bool) -> None:
    """The checks of the root disk's back end, which need no host state: inspect asks them too."""
    _backend_class(root).refuse_unsupported(root, discard_snapshots)
