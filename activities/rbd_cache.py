"""The base images the RBD back end imported into Ceph pools, as ``rebuild cache`` counts them.

Each base is recorded in the worker's state directory once it is whole, with how to reach its cluster
(monitors, user, the libvirt secret): its users are its clones (``rbd children``), by the domain whose
disk names one, or by the clone's own name (a rebuild's backup, or an image nothing runs). Ceph itself
refuses to remove a protected snapshot with clones; prune never asks it to.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from activities import libvirt_domain as ld
from activities.ceph_rbd import RbdSource, rbd_session
from activities.errors import DiskToolFailed, InstanceNotFound, UnsupportedInstance
from activities.state import StateDir

RECORDS_PREFIX = "rbd-"
BASE_PREFIX = "rebuild-base-"
# The base's snapshot that every clone hangs from: protected, so Ceph refuses to remove it under them.
SNAPSHOT = "rebuild"


def base_name(sha256: str) -> str:
    return f"{BASE_PREFIX}{sha256}"


def records_dir(state: StateDir, pool: str) -> Path:
    """Where the bases of one Ceph pool are recorded (beside the storage pools' copies)."""
    return state.pool_images(f"{RECORDS_PREFIX}{pool}")


@dataclass(frozen=True)
class RbdBase:
    sha256: str
    record: Path
    source: RbdSource
    size: int
    users: tuple[str, ...]
    imports: int

    @property
    def where(self) -> str:
        return f"rbd {self.source.pool}"


def rbd_bases(state: StateDir, conn: ld.Libvirt) -> list[RbdBase]:
    """Every recorded base whose image still exists; one whose cluster cannot be asked is listed as in
    use by that reason, so that prune keeps it."""
    top = state.root / "pool-images"
    if not top.is_dir():
        return []
    named = _rbd_disks(conn)
    found = []
    for directory in sorted(top.glob(f"{RECORDS_PREFIX}*")):
        for record in sorted(directory.iterdir()):
            if len(record.name) != 64 or not record.is_file():
                continue
            note = json.loads(record.read_text())
            source = RbdSource(
                note["pool"], note["image"], tuple(note["hosts"]), note["user"],
                note.get("secret_uuid"), note.get("secret_usage"),
            )  # fmt: skip
            try:
                with rbd_session(conn, source, f"RBD base {source.name}", state.root / "rbd") as rbd:
                    info = rbd.info(source.image)
                    if info is None:
                        continue
                    children = rbd.children(f"{source.image}@{SNAPSHOT}")
                users = tuple(sorted({named.get(child, child) for child in children}))
                size = int(info["size"])
            except (DiskToolFailed, UnsupportedInstance) as err:
                users, size = (f"not reachable: {err.message}",), 0
            found.append(RbdBase(record.name, record, source, size, users, int(note.get("imports", 0))))
    return found


def remove_base(state: StateDir, conn: ld.Libvirt, base: RbdBase) -> None:
    """A base no clone depends on goes: its snapshot unprotected and removed, then the image."""
    with rbd_session(conn, base.source, f"RBD base {base.source.name}", state.root / "rbd") as rbd:
        snapshot = rbd.image(f"{base.source.image}@{SNAPSHOT}")
        if any(str(s["name"]) == SNAPSHOT for s in rbd.snapshots(base.source.image)):
            if rbd.children(f"{base.source.image}@{SNAPSHOT}"):
                return
            rbd.call("snap", "unprotect", snapshot)
            rbd.call("snap", "rm", "--no-progress", snapshot)
        if rbd.info(base.source.image) is not None:
            rbd.remove(base.source.image)
    base.record.unlink(missing_ok=True)


def _rbd_disks(conn: ld.Libvirt) -> dict[str, str]:
    """POOL/IMAGE -> the domain whose RBD disk names it (persistent or running definition)."""
    named = {}
    for name in conn.domain_names():
        try:
            definitions = conn.domain(name).definitions()
        except InstanceNotFound:
            continue
        for xml in definitions:
            for disk in xml.findall("./devices/disk[@type='network']"):
                source = disk.find("source")
                if source is not None and source.get("protocol") == "rbd" and source.get("name"):
                    named[str(source.get("name"))] = name
    return named
