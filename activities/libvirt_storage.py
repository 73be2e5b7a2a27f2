"""libvirt's storage API: pools and their volumes, as the volume back end uses them.

libvirt already abstracts dir, fs, netfs, disk (partitions), logical (LVM) pools and more: a rebuild
creates, fills, finds and deletes volumes through it rather than calling the tools of each kind.
Every call blocks (run it in a thread); libvirt's errors are translated once, here.
"""

from __future__ import annotations

import contextlib
import subprocess
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import libvirt

from activities import domain_xml as dx
from activities.errors import (
    DefinitionRefused,
    HostOutOfSpace,
    HypervisorError,
    HypervisorUnavailable,
    UnsupportedInstance,
)
from activities.libvirt_domain import Libvirt

T = TypeVar("T")
UPLOAD_CHUNK = 4 << 20
# Pools a rebuild can make a volume in: files (dir, fs, netfs) or block devices (disk, logical).
FILE_POOLS = ("dir", "fs", "netfs")
BLOCK_POOLS = ("disk", "logical")


def _call(what: str, action: Callable[[], T]) -> T:
    try:
        return action()
    except libvirt.libvirtError as err:
        code = err.get_error_code()
        message = err.get_error_message() or str(err)
        if code in (libvirt.VIR_ERR_NO_STORAGE_POOL, libvirt.VIR_ERR_NO_STORAGE_VOL):
            raise UnsupportedInstance(f"{what}: {message}") from None
        if code in (libvirt.VIR_ERR_NO_CONNECT, libvirt.VIR_ERR_INVALID_CONN, libvirt.VIR_ERR_RPC):
            raise HypervisorUnavailable(f"libvirt is unreachable: {message}") from None
        if "no large enough free extent" in message or "No space left" in message:
            raise HostOutOfSpace(f"{what}: {message}") from None
        if code in (
            libvirt.VIR_ERR_CONFIG_UNSUPPORTED,
            libvirt.VIR_ERR_XML_ERROR,
            libvirt.VIR_ERR_INVALID_ARG,
        ):
            raise DefinitionRefused(f"{what}: {message}") from None
        raise HypervisorError(f"{what}: {message}") from None


@dataclass(frozen=True)
class PoolInfo:
    name: str
    kind: str
    active: bool
    available: int
    target: str


class Pool:
    def __init__(self, libvirt_conn: Libvirt, name: str) -> None:
        self.libvirt = libvirt_conn
        self.name = name

    def _pool(self) -> Any:
        return _call(
            f"storage pool {self.name!r}",
            lambda: self.libvirt.connection().storagePoolLookupByName(self.name),
        )

    def info(self) -> PoolInfo:
        pool = self._pool()
        xml = dx.parse(_call(f"pool {self.name!r}", lambda: pool.XMLDesc(0)))
        _state, _capacity, _allocation, available = _call(f"pool {self.name!r}", pool.info)
        return PoolInfo(
            name=self.name,
            kind=str(xml.get("type")),
            active=bool(_call(f"pool {self.name!r}", pool.isActive)),
            available=int(available),
            target=xml.findtext("./target/path") or "",
        )

    def definition(self) -> ET.Element:
        pool = self._pool()
        return dx.parse(_call(f"pool {self.name!r}", lambda: pool.XMLDesc(0)))

    def refresh(self) -> None:
        pool = self._pool()
        _call(f"refresh of pool {self.name!r}", lambda: pool.refresh(0))

    def volume(self, name: str) -> Volume | None:
        pool = self._pool()
        try:
            return Volume(self, pool.storageVolLookupByName(name))
        except libvirt.libvirtError as err:
            if err.get_error_code() == libvirt.VIR_ERR_NO_STORAGE_VOL:
                return None
            raise HypervisorError(f"pool {self.name!r}: {err.get_error_message()}") from None

    def volumes(self) -> Iterator[Volume]:
        pool = self._pool()
        for volume in _call(f"pool {self.name!r}", lambda: pool.listAllVolumes(0)):
            yield Volume(self, volume)

    def create(self, definition: str, source: Volume | None = None, reflink: bool = False) -> Volume:
        """A new volume; from ``source`` (a clone, converted to the new volume's format) when given,
        by a reflink where the pool's file system allows one and it is asked for."""
        pool = self._pool()
        what = f"new volume in pool {self.name!r}"
        if source is None:
            return Volume(self, _call(what, lambda: pool.createXML(definition, 0)))
        flags = libvirt.VIR_STORAGE_VOL_CREATE_REFLINK if reflink else 0
        return Volume(self, _call(what, lambda: pool.createXMLFrom(definition, source.handle, flags)))


class Volume:
    def __init__(self, pool: Pool, handle: Any) -> None:
        self.pool = pool
        self.handle = handle

    @property
    def name(self) -> str:
        return str(self.handle.name())

    def path(self) -> str:
        return str(_call(f"volume {self.name!r}", self.handle.path))

    def capacity(self) -> int:
        _kind, capacity, _allocation = _call(f"volume {self.name!r}", self.handle.info)
        return int(capacity)

    def definition(self) -> ET.Element:
        return dx.parse(_call(f"volume {self.name!r}", lambda: self.handle.XMLDesc(0)))

    def resize(self, capacity: int) -> None:
        if self.capacity() < capacity:
            _call(f"resize of volume {self.name!r}", lambda: self.handle.resize(capacity, 0))

    def delete(self) -> None:
        try:
            self.handle.delete(0)
        except libvirt.libvirtError as err:
            if err.get_error_code() == libvirt.VIR_ERR_NO_STORAGE_VOL:
                return
            message = err.get_error_message() or ""
            if "Partition doesn't exist" not in message:
                raise HypervisorError(f"deleting volume {self.name!r}: {message}") from None
            self._delete_partition()

    def _delete_partition(self) -> None:
        """libvirt 9.0's disk pools ask parted to remove partition "p2" of a device whose name ends in
        a digit (/dev/loop0p2, /dev/nvme0n1p2) and fail: the same removal, with the number parted
        knows, and the pool refreshed."""
        device = self.pool.definition().find("./source/device")
        path = self.path()
        base = device.get("path", "") if device is not None else ""
        number = path.removeprefix(base).removeprefix("p")
        if not base or not path.startswith(base) or not number.isdigit():
            raise HypervisorError(f"deleting volume {self.name!r}: not a partition of {base or 'its pool'}")
        done = subprocess.run(
            ["parted", "--script", base, "rm", number], capture_output=True, text=True, check=False
        )
        if done.returncode != 0:
            raise HypervisorError(f"deleting partition {path}: {done.stderr.strip()}")
        self.pool.refresh()

    def upload(self, source: Path) -> None:
        """The file's bytes, as they are, into the volume from its start, streamed through libvirt."""
        conn = self.pool.libvirt.connection()
        size = source.stat().st_size
        stream = _call("a libvirt stream", lambda: conn.newStream(0))
        _call(f"upload into volume {self.name!r}", lambda: self.handle.upload(stream, 0, size, 0))
        try:
            with open(source, "rb") as data:
                while chunk := data.read(UPLOAD_CHUNK):
                    _call(f"upload into volume {self.name!r}", lambda c=chunk: stream.send(c))  # type: ignore[misc]
            _call(f"upload into volume {self.name!r}", stream.finish)
        except BaseException:
            with contextlib.suppress(libvirt.libvirtError):
                stream.abort()
            raise


def volume_by_path(libvirt_conn: Libvirt, path: str) -> Volume | None:
    """The pool volume whose path this is (a block device a pool manages), or None."""
    conn = libvirt_conn.connection()
    try:
        handle = conn.storageVolLookupByPath(path)
        pool_handle = handle.storagePoolLookupByVolume()
    except libvirt.libvirtError:
        return None
    return Volume(Pool(libvirt_conn, pool_handle.name()), handle)


def pools(libvirt_conn: Libvirt) -> list[Pool]:
    """The host's active storage pools."""
    conn = libvirt_conn.connection()
    listed = _call(
        "the storage pools", lambda: conn.listAllStoragePools(libvirt.VIR_CONNECT_LIST_STORAGE_POOLS_ACTIVE)
    )
    return [Pool(libvirt_conn, p.name()) for p in listed]
