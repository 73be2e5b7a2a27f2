"""A host's snapshot records: one JSON file per snapshot ID, naming an image in the host's cache.

The record is the snapshot: its image is an ordinary cached image (named by its SHA-256, checked like
any other when a rebuild uses it), and cache pruning keeps every image a record names. A record is
written atomically after its image is whole, so a record always names an image that exists.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from pydantic import ValidationError

from activities.errors import SnapshotNotFound
from activities.state import StateDir, fsync_dir, require_sha256, require_snapshot_id, write_atomically
from workflows.snapshot_models import SNAPSHOT_ID, SnapshotRecord


class SnapshotStore:
    def __init__(self, state: StateDir) -> None:
        self.state = state

    def save(self, record: SnapshotRecord) -> None:
        require_sha256(record.sha256)
        path = self.state.snapshot_record(record.snapshot_id)
        write_atomically(path, record.model_dump_json(indent=2), mode=0o600)
        fsync_dir(path.parent)

    def find(self, snapshot_id: str) -> SnapshotRecord | None:
        path = self.state.snapshot_record(snapshot_id)
        try:
            record = SnapshotRecord.model_validate_json(path.read_bytes())
        except FileNotFoundError:
            return None
        except ValidationError:
            return None  # not one of ours (written by hand, or half a file from another tool)
        if record.snapshot_id != snapshot_id or not self.state.image_path(record.sha256).exists():
            return None
        return record

    def get(self, snapshot_id: str) -> SnapshotRecord:
        record = self.find(require_snapshot_id(snapshot_id))
        if record is None:
            raise SnapshotNotFound(f"no snapshot {snapshot_id} on this host")
        return record

    def all(self, instance: str | None = None) -> list[SnapshotRecord]:
        """Every snapshot on this host (of ``instance`` only, when given), oldest first."""
        found = []
        for path in self._record_files():
            record = self.find(path.stem)
            if record is not None and instance in (None, record.instance):
                found.append(record)
        return sorted(found, key=lambda r: (r.taken_at, r.snapshot_id))

    def kept_images(self) -> set[str]:
        """The digests every record names: images cache pruning must never remove."""
        return {r.sha256 for r in self.all()}

    def delete(self, snapshot_id: str, images_in_use: set[str]) -> bool:
        """The record goes, then its image unless another record names it or an instance's disk is
        backed by it (it stays a cached image, pruned once unused). False: there was no such record."""
        record = self.find(require_snapshot_id(snapshot_id))
        path = self.state.snapshot_record(snapshot_id)
        if record is None:
            return False
        path.unlink()
        fsync_dir(path.parent)
        if record.sha256 not in self.kept_images() | images_in_use:
            with contextlib.suppress(FileNotFoundError):
                self.state.image_path(record.sha256).unlink()
        return True

    def _record_files(self) -> list[Path]:
        if not self.state.snapshots.is_dir():
            return []
        return [p for p in self.state.snapshots.glob("*.json") if SNAPSHOT_ID.fullmatch(p.stem)]
