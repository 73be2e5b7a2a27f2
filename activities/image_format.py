"""What an image really is, read from its own bytes before any tool is allowed to open it.

qemu-img follows whatever an image names: a backing file, a VMDK extent, a qcow2 external data file
can point at any path on the host. So the header is parsed here first; only formats we accept, without
any such reference, are then handed to ``qemu-img info`` with an explicit ``-f``.
"""

from __future__ import annotations

import re
import struct
from pathlib import Path
from typing import Any

from activities.errors import UnsafeImage

ACCEPTED_FORMATS = ("raw", "qcow2")
HEADER_BYTES = 64 * 1024

QCOW2_MAGIC = b"QFI\xfb"
# Incompatible feature bits: dirty, corrupt, external data file, compression type, extended L2.
QCOW2_DIRTY, QCOW2_CORRUPT, QCOW2_DATA_FILE = 1 << 0, 1 << 1, 1 << 2
QCOW2_KNOWN_INCOMPATIBLE = 0b11111
QCOW2_EXT_END = 0x00000000
QCOW2_EXT_BACKING_FORMAT = 0xE2792ACA
QCOW2_EXT_DATA_FILE = 0x44415441

# Every signature qemu's format probes recognise (qemu-img info without -f would believe them), plus ISO.
_REFUSED_SIGNATURES: tuple[tuple[int, bytes, str], ...] = (
    (0, b"KDMV", "vmdk"),
    (0, b"COWD", "vmdk"),
    (0, b"# Disk DescriptorFile", "vmdk"),
    (0, b"vhdxfile", "vhdx"),
    (0, b"conectix", "vpc"),
    (0, b"QED\x00", "qed"),
    (0, b"LUKS\xba\xbe", "luks"),
    (0x40, struct.pack("<I", 0xBEDA107F), "vdi"),
    (0, b"WithoutFreeSpace", "parallels"),
    (0, b"WithouFreSpacExt", "parallels"),
    (0, b"Bochs Virtual HD Image\x00", "bochs"),
    (0, b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n", "cloop"),
    (0x8001, b"CD001", "iso"),
    (0x8801, b"CD001", "iso"),
    (0x9001, b"CD001", "iso"),
)
# A GUID partition table's header: fine inside a raw disk, a second identity inside anything else.
_GPT_SIGNATURE = (512, b"EFI PART")
# An image whose guest-visible start is all zeros has nothing a BIOS or UEFI could boot, nor a
# partition table or filesystem superblock (ext4's sits at 1 KiB, XFS's at 0, GPT at 512 bytes).
EMPTY_PROBE_BYTES = 1 << 20
_VMDK_DESCRIPTOR_VERSION = re.compile(rb"version=[0-9]")


def detect_formats(header: bytes) -> list[str]:
    """Every format the header's signatures claim, in the order qemu would believe them."""
    found: list[str] = []
    if header.startswith(QCOW2_MAGIC):
        # qemu probes version 1 as the old qcow format, any later one as qcow2.
        found.append("qcow" if header[4:8] == b"\x00\x00\x00\x01" else "qcow2")
    for offset, signature, name in _REFUSED_SIGNATURES:
        if header[offset : offset + len(signature)] == signature and name not in found:
            found.append(name)
    if "vmdk" not in found and _is_vmdk_descriptor(header):
        found.append("vmdk")
    offset, signature = _GPT_SIGNATURE
    if found and header[offset : offset + len(signature)] == signature:
        found.append("gpt")
    return found


def detect_format(header: bytes) -> str:
    found = detect_formats(header)
    return found[0] if found else "raw"


def _is_vmdk_descriptor(header: bytes) -> bool:
    """A VMDK text descriptor as qemu probes it: comment and blank lines, then ``version=N``.

    No fixed magic: ``version=1`` on the first line is enough for qemu to open the extents the
    descriptor names, wherever they point. Blank lines are skipped more freely than qemu does.
    """
    position = 0
    while position < len(header):
        end = header.find(b"\n", position)
        line = header[position:] if end < 0 else header[position:end]
        if line.startswith(b"#") or not line.strip(b" \t\r"):
            if end < 0:
                return False
            position = end + 1
            continue
        return _VMDK_DESCRIPTOR_VERSION.match(line) is not None
    return False


def inspect_header(path: Path) -> str:
    """The image's format, or UnsafeImage naming why it is refused."""
    with open(path, "rb") as image:
        header = image.read(HEADER_BYTES)
        image.seek(0, 2)
        size = image.tell()
        if size >= 512:
            image.seek(size - 512)
            footer = image.read(512)
        else:
            footer = b""
    found = detect_formats(header)
    if not found and footer.startswith(b"conectix"):
        found = ["vpc"]
    if len(found) > 1:
        # A polyglot: each reader sees another image, and a check passed as one format says
        # nothing about the other (OpenStack's format inspector refuses these too).
        raise UnsafeImage(f"image is at once {' and '.join(found)}: refused as ambiguous")
    fmt = found[0] if found else "raw"
    if fmt not in ACCEPTED_FORMATS:
        raise UnsafeImage(f"format {fmt} is not accepted (only {', '.join(ACCEPTED_FORMATS)})")
    if fmt == "qcow2":
        _check_qcow2_header(header, size)
    return fmt


def _check_qcow2_header(header: bytes, file_size: int) -> None:
    if len(header) < 72:
        raise UnsafeImage("qcow2 header is truncated")
    version, backing_offset, backing_size, cluster_bits = struct.unpack_from(">IQII", header, 4)
    (crypt_method,) = struct.unpack_from(">I", header, 32)
    if version not in (2, 3):
        raise UnsafeImage(f"qcow2 version {version} is unknown")
    if backing_offset or backing_size:
        raise UnsafeImage("qcow2 image names a backing file")
    if not 9 <= cluster_bits <= 21:
        raise UnsafeImage(f"qcow2 cluster_bits {cluster_bits} is out of range")
    if crypt_method:
        # qemu-img info reads it without a key, but no instance could boot it without one.
        raise UnsafeImage(f"qcow2 image is encrypted (crypt_method {crypt_method})")
    if version == 2:
        return
    if len(header) < 104:
        raise UnsafeImage("qcow2 v3 header is truncated")
    (incompatible,) = struct.unpack_from(">Q", header, 72)
    if incompatible & QCOW2_DATA_FILE:
        raise UnsafeImage("qcow2 image uses an external data file")
    if incompatible & QCOW2_CORRUPT:
        raise UnsafeImage("qcow2 image is marked corrupt")
    if incompatible & ~QCOW2_KNOWN_INCOMPATIBLE:
        raise UnsafeImage(f"qcow2 image has unknown incompatible features {incompatible:#x}")
    (header_length,) = struct.unpack_from(">I", header, 100)
    if header_length < 104 or header_length > min(len(header), file_size):
        raise UnsafeImage(f"qcow2 header length {header_length} is inconsistent with the file")
    _check_qcow2_extensions(header, header_length)


def _check_qcow2_extensions(header: bytes, position: int) -> None:
    while position + 8 <= len(header):
        kind, length = struct.unpack_from(">II", header, position)
        if kind == QCOW2_EXT_END:
            return
        if kind == QCOW2_EXT_BACKING_FORMAT:
            raise UnsafeImage("qcow2 image names a backing format")
        if kind == QCOW2_EXT_DATA_FILE:
            raise UnsafeImage("qcow2 image names an external data file")
        position += 8 + (length + 7) // 8 * 8
    raise UnsafeImage("qcow2 header extensions run past the header")


def check_info(info: dict[str, Any], fmt: str) -> None:
    """What qemu-img itself reports must agree with the header and reach nothing outside."""
    if info.get("format") != fmt:
        raise UnsafeImage(f"qemu-img reads the image as {info.get('format')}, header says {fmt}")
    if info.get("backing-filename") or info.get("full-backing-filename"):
        raise UnsafeImage("image names a backing file")
    specific = info.get("format-specific", {}).get("data", {})
    if specific.get("data-file"):
        raise UnsafeImage("image names an external data file")
    if specific.get("corrupt"):
        raise UnsafeImage("image is marked corrupt")
    if int(info.get("virtual-size", -1)) < 0:
        raise UnsafeImage("image reports no virtual size")


def raw_start_is_empty(path: Path) -> bool:
    """True when the first EMPTY_PROBE_BYTES of a raw image (or all of a shorter one) are zeros."""
    with open(path, "rb") as image:
        start = image.read(EMPTY_PROBE_BYTES)
    return not start.strip(b"\x00")


def mapped_start_is_empty(extents: list[dict[str, Any]]) -> bool:
    """From ``qemu-img map`` of the image's start: True when no extent there holds non-zero data."""
    return not any(
        extent.get("data") and not extent.get("zero") and int(extent.get("start", 0)) < EMPTY_PROBE_BYTES
        for extent in extents
    )
