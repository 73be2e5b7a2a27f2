"""Whether an instance can be rebuilt: every refusal, asked while it runs and again before the swap.

A shape that a rebuild would break, or could not finish, is refused before the stop, with its reason and
the way out. Asked again by prepare (the instance is off then) for what may have changed meanwhile.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from activities import domain_xml as dx
from activities import libvirt_domain as ld
from activities import qcow2
from activities.errors import DiskMissing, HostOutOfSpace, UnsupportedInstance

# The new disk's qcow2 metadata and the records next to it need little; a disk with less than this
# free would fail after the stop.
MIN_FREE_BYTES = 64 << 20

DISCARD = "pass --discard-snapshots (they stay until the rebuild is kept, so a rollback brings them back)"


def refuse_unrebuildable(domain: ld.Domain, disk: dx.RootDisk, discard_snapshots: bool) -> None:
    """Every check below, cheapest first; the first that fails raises with its reason."""
    refuse_domain_state(domain)
    _refuse_saved_state(domain, disk.target, discard_snapshots)
    _refuse_unusable_file(domain.name, disk, discard_snapshots)
    _refuse_shared_file(domain.libvirt, domain.name, disk)


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


def _refuse_shared_file(conn: ld.Libvirt, instance: str, disk: dx.RootDisk) -> None:
    """No other disk uses the root disk's file: as its own source, or anywhere in its backing chain.

    A linked clone (another domain's overlay on this file) would read the new disk's bytes as its base.
    """
    real = Path(os.path.realpath(disk.path))
    for name, target, files in conn.disk_users(skip=(instance, disk.target)):
        chain = [Path(os.path.realpath(f)) for f in files]
        if len(chain) == 1:
            chain += qcow2.backing_chain(chain[0])
        if real in chain:
            how = "uses it" if chain[0] == real else "has it in its backing chain"
            raise UnsupportedInstance(
                f"instance {instance!r}: root disk {disk.path} is shared: disk {target} of domain "
                f"{name!r} {how}"
            )
