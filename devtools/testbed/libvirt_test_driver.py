"""Instances on libvirt's built-in ``test:///`` driver: a real libvirt driver, in process, no daemon."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from activities.libvirt_domain import Libvirt
from devtools.guest import write_image

TEST_NS = "http://libvirt.org/schemas/domain/test/1.0"
RUNNING, SHUTOFF = 1, 5


@dataclass
class DriverInstance:
    libvirt: Libvirt
    name: str
    disk: Path
    data_disk: Path
    serial: Path


def make_instance(
    tmp_path: Path,
    name: str = "vm-1",
    running: bool = True,
    root_first: bool = True,
    disk_size: int = 1 << 20,
) -> DriverInstance:
    """A node file with one instance whose root disk is a real raw file under ``tmp_path``."""
    return make_instances(tmp_path, [name], running, root_first, disk_size)[0]


def make_instances(
    tmp_path: Path,
    names: list[str],
    running: bool = True,
    root_first: bool = True,
    disk_size: int = 1 << 20,
) -> list[DriverInstance]:
    """One node file, one shared connection, an instance per name, each with real disk files."""
    domains = []
    made = []
    for index, name in enumerate(names):
        disk = write_image(tmp_path / f"{name}.img", "old image", size=disk_size)
        data = tmp_path / f"{name}-data.img"
        data.write_bytes(b"data disk" * 100)
        serial = tmp_path / f"{name}.serial.log"
        root = (
            "<disk type='file' device='disk'><driver name='qemu' type='raw'/>"
            f"<source file='{disk}'/><target dev='vda' bus='virtio'/><boot order='1'/></disk>"
        )
        extra = (
            "<disk type='file' device='disk'><driver name='qemu' type='raw'/>"
            f"<source file='{data}'/><target dev='vdb' bus='virtio'/></disk>"
        )
        disks = root + extra if root_first else extra + root
        domains.append(
            f"""  <domain type='test' xmlns:test='{TEST_NS}'>
    <name>{name}</name>
    <uuid>11111111-2222-3333-4444-{index:012d}</uuid>
    <memory>65536</memory>
    <os><type>hvm</type></os>
    <devices>
      {disks}
      <interface type='user'><mac address='52:54:00:00:00:01'/></interface>
      <interface type='user'><mac address='52:54:00:00:00:02'/></interface>
      <serial type='file'><source path='{serial}' append='on'/><target port='0'/></serial>
    </devices>
    <test:runstate>{RUNNING if running else SHUTOFF}</test:runstate>
  </domain>"""
        )
        made.append((name, disk, data, serial))
    node = tmp_path / "node.xml"
    node.write_text("<node>\n" + "\n".join(domains) + "\n</node>")
    conn = Libvirt(f"test://{node}")
    return [DriverInstance(conn, *fields) for fields in made]
