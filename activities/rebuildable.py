"""Whether an instance can be rebuilt: every refusal, asked while it runs and again before the swap.

A shape that a rebuild would break, or could not finish, is refused before the stop, with its reason and
the way out. Asked again by prepare (the instance is off then) for what may have changed meanwhile.
"""

from __future__ import annotations

from activities import domain_xml as dx
from activities import libvirt_domain as ld
from activities.errors import UnsupportedInstance
from activities.root_disks import DISCARD, RootDiskAt, refuse_unsupported


def refuse_unrebuildable(root: RootDiskAt, discard_snapshots: bool) -> None:
    """Every check below, cheapest first, then the root disk's back end's own; the first that fails
    raises with its reason."""
    refuse_domain_state(root.domain)
    _refuse_saved_state(root.domain, root.disk.target, discard_snapshots)
    refuse_unsupported(root, discard_snapshots)


def refuse_domain_state(domain: ld.Domain) -> None:
    """A transient domain vanishes at the stop; a paused or suspended one cannot shut down cleanly."""
    name = domain.name
    if not domain.is_persistent():
        raise UnsupportedInstance(
            f"instance {name!r} is transient (no persistent definition, as `virsh create` makes it): "
            "a stop would remove it; define it (virsh define) to rebuild it"
        )
    frozen = domain.frozen()
    if frozen is not None:
        raise UnsupportedInstance(
            f"instance {name!r} is {frozen}; resume it (virsh resume, virsh dompmwakeup) or shut it off "
            "before a rebuild"
        )


def _refuse_saved_state(domain: ld.Domain, target: str, discard_snapshots: bool) -> None:
    """Saved memory, snapshots, checkpoints and running jobs belong to the old disk."""
    name = domain.name
    if domain.has_managed_save():
        raise UnsupportedInstance(
            f"instance {name!r} has a managed save image: its next start would resume the saved memory "
            "on top of the new disk; start it (virsh start) or discard the saved state "
            "(virsh managedsave-remove) first"
        )
    snapshots = domain.snapshot_names()
    if snapshots and not discard_snapshots:
        raise UnsupportedInstance(
            f"instance {name!r} has snapshots ({', '.join(snapshots)}) of its current disk; delete them, "
            f"or {DISCARD}"
        )
    checkpoints = sorted(n for n, xml in domain.checkpoints().items() if dx.checkpoint_covers(xml, target))
    if checkpoints:
        raise UnsupportedInstance(
            f"instance {name!r} has checkpoints of its root disk {target} ({', '.join(checkpoints)}): "
            "their bitmaps live in the old disk; delete them (virsh checkpoint-delete) first"
        )
    if not domain.is_active():
        return
    if domain.has_block_job(target):
        raise UnsupportedInstance(
            f"instance {name!r} has a block job on its root disk {target}; let it finish or abort it "
            "(virsh blockjob --abort) first"
        )
    if domain.has_job():
        raise UnsupportedInstance(
            f"instance {name!r} has a job running (a migration, backup, dump or save; virsh "
            "domjobinfo shows it); let it finish first"
        )
