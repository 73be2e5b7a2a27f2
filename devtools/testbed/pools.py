"""Storage pools on libvirtd for the tests and benches: a dir pool, an fs pool on an XFS loop device,
a disk pool on a loop device (its partitions are block devices), and a root volume that boots; and an
XFS file system with reflinks on a loop device, for file disks and a worker's state beside them."""

from __future__ import annotations

import contextlib
import os
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import libvirt

from devtools.guest import boot_sector, write_image
from devtools.testbed.e2e import DOMAIN_PREFIX
from devtools.testbed.shapes import Bed, Shaped

VOLUME_BYTES = 4 << 20


@dataclass
class Pool:
    """A pool the test made, and what to undo: the pool, its loop device, its backing file."""

    handle: Any
    kind: str
    loop: str | None = None

    @property
    def name(self) -> str:
        return str(self.handle.name())

    def volume(self, name: str) -> Any:
        self.handle.refresh(0)
        return self.handle.storageVolLookupByName(name)

    def names(self) -> set[str]:
        self.handle.refresh(0)
        return {v.name() for v in self.handle.listAllVolumes(0)}


def losetup(path: Path) -> str:
    return subprocess.run(
        ["losetup", "--find", "--show", "--partscan", str(path)], capture_output=True, text=True, check=True
    ).stdout.strip()


@contextlib.contextmanager
def xfs_mount(directory: Path, size: int = 512 << 20) -> Iterator[Path]:
    """An XFS file system with reflinks (``mkfs.xfs -m reflink=1``) on a loop device, mounted at
    ``directory/xfs`` (QEMU's user may traverse it), unmounted and gone afterwards."""
    backing, target = directory / "xfs.img", directory / "xfs"
    with open(backing, "wb") as image:
        image.truncate(size)
    subprocess.run(["mkfs.xfs", "-q", "-f", "-m", "reflink=1", str(backing)], check=True)
    target.mkdir()
    subprocess.run(["mount", "-o", "loop", str(backing), str(target)], check=True)
    try:
        os.chmod(target, 0o711)
        yield target
    finally:
        subprocess.run(["umount", "--lazy", str(target)], check=False)
        backing.unlink(missing_ok=True)


def shared_bytes(path: Path) -> int:
    """How many of the file's bytes share their extents with another file (``filefrag -v``)."""
    out = subprocess.run(
        ["filefrag", "-v", "-b1", str(path)], capture_output=True, text=True, check=True
    ).stdout
    shared = 0
    for line in out.splitlines():
        fields = line.replace(":", " ").replace("..", " ").split()
        if fields and fields[0].isdigit() and "shared" in line:
            shared += int(fields[5])
    return shared


def make_pool(conn: Any, directory: Path, kind: str, volume_bytes: int = VOLUME_BYTES) -> Pool:
    """A pool of ``kind`` with room for a few volumes of ``volume_bytes``."""
    name = f"{DOMAIN_PREFIX}{kind}-{uuid.uuid4().hex[:6]}"
    target = directory / f"pool-{kind}"
    loop = None
    if kind == "dir":
        target.mkdir()
        xml = f"<pool type='dir'><name>{name}</name><target><path>{target}</path></target></pool>"
    else:
        backing = directory / f"pool-{kind}.img"
        with open(backing, "wb") as image:
            image.truncate(
                max(512 << 20, 6 * volume_bytes) if kind == "fs" else max(64 << 20, 3 * volume_bytes)
            )
        loop = losetup(backing)
        if kind == "fs":
            target.mkdir()
            source = f"<device path='{loop}'/><format type='xfs'/>"
        else:
            source = f"<device path='{loop}'/><format type='gpt'/>"
            target = Path("/dev")
        xml = (
            f"<pool type='{kind}'><name>{name}</name><source>{source}</source>"
            f"<target><path>{target}</path></target></pool>"
        )
    handle = conn.storagePoolDefineXML(xml, 0)
    pool = Pool(handle, kind, loop)
    try:
        if kind != "dir":
            handle.build(libvirt.VIR_STORAGE_POOL_BUILD_OVERWRITE)
        handle.create(0)
    except BaseException:
        remove_pool(pool)
        raise
    return pool


def remove_pool(pool: Pool) -> None:
    try:
        if pool.handle.isActive():
            if pool.kind != "disk":  # a disk pool's partitions go with the loop device
                for volume in pool.handle.listAllVolumes(0):
                    volume.delete(0)
            pool.handle.destroy()
        pool.handle.undefine()
    except libvirt.libvirtError:
        pass
    if pool.loop is not None:
        subprocess.run(["losetup", "-d", pool.loop], check=False)


def root_volume(
    conn: Any, directory: Path, pools: dict[str, Pool], kind: str, fmt: str, size: int = VOLUME_BYTES
) -> tuple[Pool, Any]:
    """A volume that boots image A, in a new pool of ``kind``."""
    pool = make_pool(conn, directory, kind, size)
    pools[kind] = pool
    name = f"root.{fmt}"
    if kind == "disk":
        assert pool.loop is not None
        name = f"{Path(pool.loop).name}p1"
    volume = pool.handle.createXML(
        f"<volume><name>{name}</name><capacity>{size}</capacity>"
        f"<target><format type='{fmt if kind != 'disk' else 'none'}'/></target></volume>",
        0,
    )
    if fmt == "qcow2":
        staging = write_image(directory / "a.qcow2", "image A", fmt="qcow2", size=size)
        subprocess.run(
            ["qemu-img", "convert", "-q", "-n", "-O", "qcow2", str(staging), volume.path()], check=True
        )
    else:
        with open(volume.path(), "r+b") as disk:
            disk.write(boot_sector("image A"))
    return pool, volume


def guest_on(bed: Bed, pool: Pool, volume: Any, fmt: str) -> Shaped:
    if pool.kind == "disk":
        source = (
            "<disk type='block' device='disk'><driver name='qemu' type='raw'/>"
            f"<source dev='{volume.path()}'/>"
        )
    else:
        source = (
            f"<disk type='volume' device='disk'><driver name='qemu' type='{fmt}'/>"
            f"<source pool='{pool.name}' volume='{volume.name()}'/>"
        )
    devices = source + "<target dev='vda' bus='virtio'/><boot order='1'/></disk>"
    return bed.define(Path(volume.path()), devices)
