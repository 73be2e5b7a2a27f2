"""Where a worker keeps its files. Paths are derived here, never remembered or taken from a request."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

DEFAULT_STATE_DIR = Path("/var/lib/durable-rebuild")
_SAFE_ID = re.compile(r"[^A-Za-z0-9_.-]")


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
        return self.images / sha256

    def sha512_index(self, sha512: str) -> Path:
        """A small file naming the SHA-256 of the image with this SHA-512, for cache hits by SHA-512."""
        return self.images / "by-sha512" / sha512

    def check_verdict(self, sha256: str) -> Path:
        """The result of the full safety check of this image, written only after it passed."""
        return self.images / "checked" / f"{sha256}.json"

    def create(self) -> None:
        self.partial.mkdir(parents=True, exist_ok=True)
        (self.images / "by-sha512").mkdir(exist_ok=True)
        (self.images / "checked").mkdir(exist_ok=True)
        # QEMU runs as its own unprivileged user and opens cached images as backing files: it must
        # traverse the way to them, whatever the worker's umask. It may not list them, and partial
        # downloads stay private to the worker.
        for directory in (self.root, self.images):
            os.chmod(directory, os.stat(directory).st_mode & 0o7777 | 0o111)  # noqa: S103
        os.chmod(self.partial, 0o700)


def backup_path(disk_path: str, rebuild_id: str) -> Path:
    """The old root disk's name while a rebuild runs: next to it, derived from the rebuild."""
    return Path(f"{disk_path}.rebuild-{_SAFE_ID.sub('_', rebuild_id)}.backup")


def new_disk_path(disk_path: str, rebuild_id: str) -> Path:
    """Where the new root disk is written before an atomic rename puts it in place."""
    return Path(f"{disk_path}.rebuild-{_SAFE_ID.sub('_', rebuild_id)}.new")


def fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` survive a power cut."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
