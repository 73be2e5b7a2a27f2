"""What a qcow2 header says about a file: its backing file, whether it is encrypted, its snapshots.

Read from the header bytes themselves (the layout of QEMU's docs/interop/qcow2.txt), never by asking
a tool to open the file: the files read here are instances' own disks, some in use by a guest.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

MAGIC = b"QFI\xfb"
_HEADER = struct.Struct(">4sIQIIQIIQQIIQ")
# Bounds for what a header may ask us to read: a header is the disk owner's, not ours to trust blindly.
MAX_BACKING_NAME = 1023
MAX_SNAPSHOTS_LISTED = 64
_SNAPSHOT_ENTRY = struct.Struct(">QIHHIIQII")


@dataclass(frozen=True)
class Qcow2Header:
    backing_file: str | None
    encrypted: bool
    virtual_size: int
    snapshots: list[str] = field(default_factory=list)
    snapshot_count: int = 0


def read_header(path: Path) -> Qcow2Header | None:
    """The header of a qcow2 file; None when the file is not qcow2 (or not there)."""
    try:
        with open(path, "rb") as disk:
            raw = disk.read(_HEADER.size)
            if len(raw) < _HEADER.size or not raw.startswith(MAGIC):
                return None
            fields = _HEADER.unpack(raw)
            backing_offset, backing_size, virtual_size, crypt_method = (
                fields[2],
                fields[3],
                fields[5],
                fields[6],
            )
            nb_snapshots, snapshots_offset = fields[11], fields[12]
            backing = None
            if backing_offset and 0 < backing_size <= MAX_BACKING_NAME:
                disk.seek(backing_offset)
                backing = disk.read(backing_size).decode(errors="replace")
            names = _snapshot_names(disk, snapshots_offset, min(nb_snapshots, MAX_SNAPSHOTS_LISTED))
    except (FileNotFoundError, IsADirectoryError):
        return None
    return Qcow2Header(
        backing_file=backing,
        encrypted=crypt_method != 0,
        virtual_size=virtual_size,
        snapshots=names,
        snapshot_count=nb_snapshots,
    )


def _snapshot_names(disk: BinaryIO, offset: int, count: int) -> list[str]:
    names = []
    position = offset
    for _ in range(count):
        disk.seek(position)
        raw = disk.read(_SNAPSHOT_ENTRY.size)
        if len(raw) < _SNAPSHOT_ENTRY.size:
            break
        entry = _SNAPSHOT_ENTRY.unpack(raw)
        id_size, name_size, extra_size = entry[2], entry[3], entry[8]
        disk.seek(position + _SNAPSHOT_ENTRY.size + extra_size + id_size)
        names.append(disk.read(name_size).decode(errors="replace"))
        length = _SNAPSHOT_ENTRY.size + extra_size + id_size + name_size
        position += length + (-length % 8)
    return names


def backing_chain(path: Path, limit: int = 16) -> list[Path]:
    """The files below ``path`` as the qcow2 headers name them (relative names from each file's
    directory), resolved; a chain longer than ``limit`` is cut there."""
    found: list[Path] = []
    current = path
    for _ in range(limit):
        header = read_header(current)
        if header is None or not header.backing_file or ":" in header.backing_file.split("/")[0]:
            break
        current = (current.parent / header.backing_file).resolve()
        found.append(current)
    return found
