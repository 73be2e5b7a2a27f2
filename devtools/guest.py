"""Tiny bootable guests for the demo and the tests.

A 512-byte boot sector that writes a marker to the first serial port and halts: the serial log then
says exactly which image the guest booted, without any OS in the way.
"""

from __future__ import annotations

import subprocess
import uuid
from pathlib import Path
from typing import Any
from xml.sax.saxutils import quoteattr

import libvirt

SECTOR = 512
_LOAD_ADDRESS = 0x7C00
_CODE = bytes.fromhex(
    "fa"  # cli
    "31c0"  # xor ax, ax
    "8ed8"  # mov ds, ax
    "fc"  # cld
    "be{msg}"  # mov si, message
    "baf803"  # mov dx, 0x3f8 (COM1)
    "ac"  # next: lodsb
    "84c0"  # test al, al
    "7403"  # jz done
    "ee"  # out dx, al
    "ebf8"  # jmp next
    "f4"  # done: hlt
    "ebfd".replace("{msg}", "0000")  # jmp done
)


def boot_sector(marker: str) -> bytes:
    """A boot sector that prints ``marker`` (and a newline) on COM1, then halts."""
    message = f"{marker}\r\n".encode("ascii") + b"\x00"
    address = _LOAD_ADDRESS + len(_CODE)
    code = bytearray(_CODE)
    code[7:9] = address.to_bytes(2, "little")
    sector = bytes(code) + message
    if len(sector) > SECTOR - 2:
        raise ValueError(f"marker {marker!r} does not fit in a boot sector")
    return sector.ljust(SECTOR - 2, b"\x00") + b"\x55\xaa"


def write_image(path: Path, marker: str, fmt: str = "raw", size: int = 1 << 20) -> Path:
    """A bootable disk image whose first sector prints ``marker``, as raw or qcow2."""
    raw = path if fmt == "raw" else path.with_suffix(path.suffix + ".raw-tmp")
    with open(raw, "wb") as disk:
        disk.write(boot_sector(marker))
        disk.truncate(size)
    if fmt != "raw":
        subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", fmt, str(raw), str(path)], check=True)
        raw.unlink()
    return path


def domain_xml(
    name: str,
    root_disk: Path,
    serial_log: Path,
    *,
    root_format: str = "raw",
    data_disks: tuple[Path, ...] = (),
    macs: tuple[str, ...] = ("52:54:00:12:34:56",),
    domain_type: str = "qemu",
    memory_mib: int = 32,
    vcpus: int = 1,
    instance_uuid: str | None = None,
) -> str:
    """A minimal domain: root disk first, optional data disks and NICs, serial console to a file."""
    disks, nics = disk_and_nic_xml(root_disk, root_format, data_disks, macs)
    return shaped_domain_xml(
        name,
        serial_log,
        disks + nics,
        domain_type=domain_type,
        memory_mib=memory_mib,
        vcpus=vcpus,
        instance_uuid=instance_uuid,
    )


def shaped_domain_xml(
    name: str,
    serial_log: Path,
    devices: str,
    *,
    os_extra: str = "",
    metadata: str = "",
    domain_type: str = "qemu",
    memory_mib: int = 32,
    vcpus: int = 1,
    instance_uuid: str | None = None,
) -> str:
    """A domain with the disks and NICs given as XML, and a serial console to a file."""
    return f"""<domain type={quoteattr(domain_type)}>
  <name>{name}</name>
  <uuid>{instance_uuid or uuid.uuid4()}</uuid>{metadata}
  <memory unit='MiB'>{memory_mib}</memory>
  <vcpu>{vcpus}</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type>{os_extra}</os>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    {devices}
    <serial type='file'><source path={quoteattr(str(serial_log))} append='on'/><target port='0'/></serial>
    <video><model type='none'/></video>
    <memballoon model='none'/>
  </devices>
</domain>"""


def disk_and_nic_xml(
    root_disk: Path, root_format: str, data_disks: tuple[Path, ...], macs: tuple[str, ...]
) -> tuple[str, str]:
    """The ``<disk>`` elements (the root disk ``vda`` boots, raw data disks follow) and the user-mode NICs."""
    disks = [
        f"<disk type='file' device='disk'><driver name='qemu' type={quoteattr(root_format)}/>"
        f"<source file={quoteattr(str(root_disk))}/><target dev='vda' bus='virtio'/>"
        "<boot order='1'/></disk>"
    ]
    for index, data in enumerate(data_disks):
        dev = "vd" + chr(ord("b") + index)
        disks.append(
            f"<disk type='file' device='disk'><driver name='qemu' type='raw'/>"
            f"<source file={quoteattr(str(data))}/><target dev='{dev}' bus='virtio'/></disk>"
        )
    nics = [
        f"<interface type='user'><mac address={quoteattr(mac)}/><model type='virtio'/></interface>"
        for mac in macs
    ]
    return "".join(disks), "".join(nics)


def remove_domain(conn: Any, name: str) -> None:
    """Destroy and undefine ``name``; a domain already gone is fine."""
    try:
        domain = conn.lookupByName(name)
        if domain.isActive():
            domain.destroy()
        domain.undefine()
    except libvirt.libvirtError:
        pass
