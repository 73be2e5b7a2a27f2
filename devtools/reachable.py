"""Directories that QEMU, running as the distribution's unprivileged user, can reach.

libvirt's DAC driver labels a guest's disks for QEMU's user, but that user must still traverse every
directory above them. Python's and pytest's temporary directories are 0700, so a guest disk inside one
fails to open on a host as its distribution leaves it (and only works where QEMU runs as root).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

ROOT = Path("/var/tmp/durable-rebuild-tests")
# Traversable, not listable: QEMU's user may open a path it is given, not browse for others.
TRAVERSE_ONLY = 0o711


def make_dir(prefix: str, parent: Path = ROOT) -> Path:
    """A new directory under ``parent`` that QEMU's user can traverse."""
    parent.mkdir(parents=True, exist_ok=True)
    os.chmod(parent, TRAVERSE_ONLY)
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    os.chmod(path, TRAVERSE_ONLY)
    return path


@contextlib.contextmanager
def reachable_dir(prefix: str) -> Iterator[Path]:
    """A temporary directory for guest disks and image caches, removed afterwards."""
    path = make_dir(prefix)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
