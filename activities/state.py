"""Where a worker keeps its files. Paths are derived here, never remembered or taken from a request.

Names in the state directory are digests, and every name is checked as one: a request, an image
server or a Glance record that says ``../../etc/cron.d/x`` where a digest belongs is refused here, in
the activity that would use it, whatever the workflow or the CLI checked before.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from activities.errors import InvalidRequest

DEFAULT_STATE_DIR = Path("/var/lib/durable-rebuild")
_SAFE_ID = re.compile(r"[^A-Za-z0-9_.-]")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_SHA512 = re.compile(r"[0-9a-f]{128}")
_SNAPSHOT_ID = re.compile(r"[0-9a-f]{32}")
MAX_REBUILD_ID = 100
# What a rebuild ID is where it names a file by itself: a workflow's run ID (a UUID), or a test's name.
_REBUILD_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")


def require_sha256(value: str) -> str:
    if not isinstance(value, str) or not _SHA256.fullmatch(value):
        raise InvalidRequest(f"not a SHA-256 digest (64 lowercase hex digits): {str(value)[:80]!r}")
    return value


def require_sha512(value: str) -> str:
    if not isinstance(value, str) or not _SHA512.fullmatch(value):
        raise InvalidRequest(f"not a SHA-512 digest (128 lowercase hex digits): {str(value)[:80]!r}")
    return value


def require_snapshot_id(value: str) -> str:
    if not isinstance(value, str) or not _SNAPSHOT_ID.fullmatch(value):
        raise InvalidRequest(f"not a snapshot ID (32 lowercase hex digits): {str(value)[:80]!r}")
    return value


def require_rebuild_id(value: str) -> str:
    """A rebuild ID as it is, never rewritten: two IDs never share a file (``a/b`` is no ID)."""
    if not isinstance(value, str) or not _REBUILD_ID.fullmatch(value):
        raise InvalidRequest(
            f"not a rebuild ID (1 to {MAX_REBUILD_ID} letters, digits, '_', '.', '-'): {str(value)[:120]!r}"
        )
    return value


def require_digest(value: str) -> str:
    """A SHA-256 or SHA-512 digest: the only names the cache's partial files and locks have."""
    return require_sha512(value) if len(value) == 128 else require_sha256(value)


@dataclass(frozen=True)
class StateDir:
    root: Path

    @property
    def images(self) -> Path:
        """Cached base images, each named by its SHA-256 and never changed after its rename."""
        return self.root / "images"

    @property
    def partial(self) -> Path:
        """Downloads in progress and their lock files."""
        return self.images / "partial"

    def image_path(self, sha256: str) -> Path:
        return self._inside(self.images, require_sha256(sha256))

    def partial_path(self, key: str, suffix: str) -> Path:
        """A download in progress (``.part``), its lock (``.lock``) or its record (``.done``)."""
        return self._inside(self.partial, f"{require_digest(key)}{suffix}")

    def sha512_index(self, sha512: str) -> Path:
        """A small file naming the SHA-256 of the image with this SHA-512, for cache hits by SHA-512."""
        return self._inside(self.images / "by-sha512", require_sha512(sha512))

    def check_verdict(self, sha256: str) -> Path:
        """The result of the full safety check of this image, written only after it passed."""
        return self._inside(self.images / "checked", f"{require_sha256(sha256)}.json")

    @staticmethod
    def _inside(directory: Path, name: str) -> Path:
        """``directory/name``, refused if a symlink would take it anywhere else."""
        path = directory / name
        if not path.resolve().is_relative_to(directory.resolve()):
            raise InvalidRequest(f"{path} resolves outside {directory}")
        return path

    def rebuild_records(self, rebuild_id: str) -> Path:
        """What a rebuild records about disks that are not files (they have no "beside" to keep it)."""
        return self._inside(self.root / "rebuilds", _rebuild_suffix(rebuild_id))

    @property
    def started(self) -> Path:
        """Which domain each rebuild started, and from where its console is this boot's (root only)."""
        return self.root / "started"

    def start_record(self, rebuild_id: str) -> Path:
        return self._inside(self.started, f"{require_rebuild_id(rebuild_id)}.json")

    def pool_images(self, pool: str) -> Path:
        """Which images a storage pool holds a copy of, each recorded once its copy is whole."""
        return self._inside(self.root / "pool-images", _SAFE_ID.sub("_", pool)[:100])

    @property
    def snapshots(self) -> Path:
        """Snapshot records, one per snapshot ID; the images they name live in ``images``."""
        return self.root / "snapshots"

    def snapshot_record(self, snapshot_id: str) -> Path:
        return self._inside(self.snapshots, f"{require_snapshot_id(snapshot_id)}.json")

    def snapshot_published(self, snapshot_id: str) -> Path:
        """The Glance image a publish of this snapshot created, so a retry uploads into the same one."""
        return self._inside(self.snapshots, f"{require_snapshot_id(snapshot_id)}.glance")

    def snapshot_partial(self, snapshot_id: str) -> Path:
        """A snapshot being copied: QEMU (the backup job) or qemu-img writes it, then it is hashed."""
        return self._inside(self.snapshots / "partial", f"{require_snapshot_id(snapshot_id)}.qcow2")

    def create(self) -> None:
        self.partial.mkdir(parents=True, exist_ok=True)
        (self.snapshots / "partial").mkdir(parents=True, exist_ok=True)
        (self.images / "by-sha512").mkdir(exist_ok=True)
        (self.images / "checked").mkdir(exist_ok=True)
        # QEMU runs as its own unprivileged user and opens cached images as backing files: it must
        # traverse the way to them, whatever the worker's umask. It may not list them, and partial
        # downloads stay private to the worker.
        # The backup job's QEMU writes a running instance's snapshot into snapshots/partial itself.
        for directory in (self.root, self.images, self.snapshots, self.snapshots / "partial"):
            os.chmod(directory, os.stat(directory).st_mode & 0o7777 | 0o111)  # noqa: S103
        os.chmod(self.partial, 0o700)


def _rebuild_suffix(rebuild_id: str) -> str:
    if not rebuild_id or len(rebuild_id) > MAX_REBUILD_ID:
        raise InvalidRequest(f"a rebuild ID has 1 to {MAX_REBUILD_ID} characters: {rebuild_id[:120]!r}")
    return _SAFE_ID.sub("_", rebuild_id)


def backup_path(disk_path: str, rebuild_id: str) -> Path:
    """The old root disk's name while a rebuild runs: next to it, derived from the rebuild."""
    return Path(f"{disk_path}.rebuild-{_rebuild_suffix(rebuild_id)}.backup")


def new_disk_path(disk_path: str, rebuild_id: str) -> Path:
    """Where the new root disk is written before an atomic rename puts it in place."""
    return Path(f"{disk_path}.rebuild-{_rebuild_suffix(rebuild_id)}.new")


def seed_path(disk_path: str, rebuild_id: str) -> Path:
    """The cloud-init seed this rebuild gives the instance: beside its root disk, for QEMU to reach."""
    return Path(f"{disk_path}.seed-{_rebuild_suffix(rebuild_id)}.iso")


def seed_undo_path(disk_path: str, rebuild_id: str) -> Path:
    """What the instance had before this rebuild's seed (its old seed and identity), for the undo."""
    return Path(f"{disk_path}.rebuild-{_rebuild_suffix(rebuild_id)}.seed-undo.json")


# What prepare records beside the root disk, for restore and cleanup to trust (never a request's word):
# ``format``, the old disk's format as libvirt defined it; ``disk.xml``, its whole ``<disk>`` element,
# which restore puts back as it was; ``snapshots.json``, the snapshots a rebuild with
# --discard-snapshots found at the swap, which cleanup forgets, and only those; ``copy.json``, how stage
# made a standalone copy (its format, whether a reflink, the file's identity) once it was whole.
RecordKind = Literal["format", "disk.xml", "snapshots.json", "copy.json"]


def record_path(disk_path: str, rebuild_id: str, kind: RecordKind) -> Path:
    return Path(f"{disk_path}.rebuild-{_rebuild_suffix(rebuild_id)}.{kind}")


def original_format_path(disk_path: str, rebuild_id: str) -> Path:
    return record_path(disk_path, rebuild_id, "format")


def write_atomically(path: Path, text: str, mode: int = 0o644) -> None:
    """A small record that appears whole or not at all, and survives a power cut once written."""
    temporary = path.with_name(f".{path.name}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temporary, path)


def fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` survive a power cut."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
