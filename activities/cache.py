"""The host's image cache: what is in it, who uses it, and eviction that never breaks an instance.

A cached image becomes the backing file of every root disk rebuilt from it, so "in use" is read from
the disks themselves: each domain's disks (and rebuild backups beside them) are qcow2 files whose
header names their backing file. An image in use is never removed, whatever its age or the size limit.
Storage pools hold copies too (the volume back end's, one per image and pool), and Ceph pools the RBD
back end's bases (``rbd_cache.py``): listed and pruned alike, by age, never while a volume is backed by
one or a clone depends on one.
"""

from __future__ import annotations

import fcntl
import functools
import os
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from activities import domain_xml as dx
from activities import libvirt_domain as ld
from activities import libvirt_storage as st
from activities import qcow2, rbd_cache
from activities.snapshot_store import SnapshotStore
from activities.state import StateDir

SHA256_NAME_LENGTH = 64


@dataclass(frozen=True)
class CacheEntry:
    sha256: str
    size: int
    last_used: float
    users: tuple[str, ...]
    # "host" for the worker's own cache, "pool NAME" for a storage pool's copy of the image, "rbd POOL"
    # for a Ceph pool's base image.
    where: str = "host"


@dataclass
class PruneReport:
    removed: list[str] = field(default_factory=list)
    kept_in_use: list[str] = field(default_factory=list)
    freed_bytes: int = 0
    partials_removed: int = 0


def backing_file(path: Path) -> str | None:
    """The backing file a qcow2 header names, read without any tool; None for anything else."""
    header = qcow2.read_header(path)
    return header.backing_file if header is not None else None


def image_users(state: StateDir, conn: ld.Libvirt) -> dict[str, set[str]]:
    """sha256 -> what keeps it: the domains whose disks are backed by it, the snapshots it is."""
    users = domain_image_users(state, conn)
    # A snapshot's image is kept while its record is: the record is the snapshot.
    for record in SnapshotStore(state).all():
        users[record.sha256].add(f"snapshot {record.snapshot_id}")
    return users


def domain_image_users(state: StateDir, conn: ld.Libvirt) -> dict[str, set[str]]:
    """sha256 -> names of the domains whose disks (or rebuild backups) are backed by it.

    Backups lie beside the file a disk path names, through any symlink: they are looked for there.
    """
    users: dict[str, set[str]] = defaultdict(set)
    images = state.images.resolve()
    for name, _target, files in conn.disk_users():
        for path in files[:1]:
            real = Path(os.path.realpath(path))
            candidates = [real, *real.parent.glob(f"{real.name}.rebuild-*")]
            for candidate in candidates:
                backing = backing_file(candidate)
                if backing and (candidate.parent / backing).resolve().parent == images:
                    users[Path(backing).name].add(name)
    return users


def list_cache(state: StateDir, conn: ld.Libvirt) -> list[CacheEntry]:
    users = image_users(state, conn)
    entries = []
    for path in _cached_images(state):
        stat = path.stat()
        entries.append(CacheEntry(path.name, stat.st_size, stat.st_mtime, tuple(sorted(users[path.name]))))
    entries.extend(entry for entry, _ in _pool_copies(state, conn))
    entries.extend(_rbd_entry(base) for base in rbd_cache.rbd_bases(state, conn))
    return sorted(entries, key=lambda e: e.last_used, reverse=True)


def _pool_copies(state: StateDir, conn: ld.Libvirt) -> list[tuple[CacheEntry, st.Volume]]:
    """The images storage pools hold a copy of (one per image and pool, made by the volume back end),
    each with the volumes backed by it: the domains whose disks they are, or the volume itself while
    it is a rebuild's backup that no domain names."""
    disks = conn.disk_users()
    found = []
    for pool in st.pools(conn):
        records = state.pool_images(pool.name)
        if not records.is_dir():
            continue
        for record in records.iterdir():
            volume = (
                pool.volume(record.read_text().strip()) if len(record.name) == SHA256_NAME_LENGTH else None
            )
            if volume is None:
                continue
            path = volume.path()
            backed = [v for v in pool.volumes() if dx.volume_backing(v.definition()) == path]
            users = set()
            for other in backed:
                names = {f"volume:{pool.name}/{other.name}", other.path()}
                using = {domain for domain, _target, files in disks if names & set(files)}
                users |= using or {f"{pool.name}/{other.name}"}
            entry = CacheEntry(
                record.name,
                volume.capacity(),
                record.stat().st_mtime,
                tuple(sorted(users)),
                f"pool {pool.name}",
            )
            found.append((entry, volume))
    return found


def _remove_pool_copy(state: StateDir, volume: st.Volume, sha256: str) -> None:
    volume.delete()
    (state.pool_images(volume.pool.name) / sha256).unlink(missing_ok=True)


def _rbd_entry(base: rbd_cache.RbdBase) -> CacheEntry:
    return CacheEntry(base.sha256, base.size, base.record.stat().st_mtime, base.users, base.where)


def prune_cache(
    state: StateDir,
    conn: ld.Libvirt,
    max_age_seconds: float,
    max_total_bytes: int | None = None,
    dry_run: bool = False,
    now: float | None = None,
) -> PruneReport:
    """Remove unused images older than ``max_age_seconds``, then the least recently used unused ones
    until the cache fits in ``max_total_bytes``. Stale partial downloads nobody holds go too."""
    now = time.time() if now is None else now
    report = PruneReport()
    # Copies outside the host's cache (a storage pool's, a Ceph pool's base): by age alone.
    copies: list[tuple[CacheEntry, Callable[[], None]]] = [
        (entry, functools.partial(_remove_pool_copy, state, volume, entry.sha256))
        for entry, volume in _pool_copies(state, conn)
    ]
    copies += [
        (_rbd_entry(base), functools.partial(rbd_cache.remove_base, state, conn, base))
        for base in rbd_cache.rbd_bases(state, conn)
    ]
    for entry, remove in copies:
        if now - entry.last_used <= max_age_seconds:
            continue
        if entry.users:
            report.kept_in_use.append(f"{entry.sha256} ({entry.where})")
            continue
        if not dry_run:
            remove()
        report.removed.append(f"{entry.sha256} ({entry.where})")
        report.freed_bytes += entry.size
    entries = [e for e in list_cache(state, conn) if e.where == "host"]
    total = sum(e.size for e in entries)
    for entry in sorted(entries, key=lambda e: e.last_used):
        too_old = now - entry.last_used > max_age_seconds
        too_big = max_total_bytes is not None and total > max_total_bytes
        if not (too_old or too_big):
            continue
        if entry.users:
            report.kept_in_use.append(entry.sha256)
            continue
        if not dry_run:
            state.image_path(entry.sha256).unlink(missing_ok=True)
            state.check_verdict(entry.sha256).unlink(missing_ok=True)
        report.removed.append(entry.sha256)
        report.freed_bytes += entry.size
        total -= entry.size
    if state.partial.exists():
        for partial in state.partial.glob("*.part"):
            if now - partial.stat().st_mtime > max_age_seconds and _unlocked(partial.with_suffix(".lock")):
                if not dry_run:
                    partial.unlink(missing_ok=True)
                report.partials_removed += 1
    return report


def _cached_images(state: StateDir) -> list[Path]:
    if not state.images.exists():
        return []
    return [
        p
        for p in state.images.iterdir()
        if p.is_file() and len(p.name) == SHA256_NAME_LENGTH and all(c in "0123456789abcdef" for c in p.name)
    ]


def _unlocked(lock_path: Path) -> bool:
    """True when no download holds this lock (a running download keeps its partial)."""
    if not lock_path.exists():
        return True
    fd = os.open(lock_path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
