"""Root disks in storage pools: stage (before the stop), the swap, and the downtime, against the floor.

Per pool kind (a dir pool's qcow2 volume, an fs pool's raw volume on XFS, a disk pool's partition) and
image size: stage (the new volume written while the instance runs), prepare (the swap, after the stop)
and the downtime (off → running) against a bare `virsh destroy` + `virsh start` of the same guest in
the same run; and the pool's copy of an image uploaded through libvirt's stream against `qemu-img
convert` of the same image into the same pool.

    .venv/bin/python -m bench.pools [--quick]
"""

from __future__ import annotations

import asyncio
import hashlib
import subprocess
import uuid
from pathlib import Path
from typing import Any

import libvirt
from temporalio.testing import ActivityEnvironment

from activities.disks import DiskActivities
from activities.hypervisor import HypervisorActivities
from activities.libvirt_domain import Libvirt
from activities.libvirt_storage import Pool as StoragePool
from activities.state import StateDir
from bench.common import QUICK, GiB, MiB, random_file, table, timed
from devtools.guest import boot_sector, shaped_domain_xml
from devtools.reachable import reachable_dir
from devtools.testbed.e2e import DOMAIN_PREFIX, DOMAIN_TYPE, LIBVIRT_URI
from devtools.testbed.pools import Pool, make_pool, remove_pool, root_volume
from workflows.models import PrepareRootDiskInput, StageRootDiskInput, StartInstanceInput, StopInstanceInput

SIZES = (64 * MiB, 256 * MiB) if QUICK else (GiB, 4 * GiB)
KINDS = (("dir", "qcow2"), ("fs", "raw"), ("disk", "raw"))


def cached_image(state: StateDir, size: int) -> str:
    """A raw image of ``size`` (a boot sector, then random bytes) in the worker's cache."""
    state.create()
    staging = random_file(state.root / "staging.raw", size)
    with open(staging, "r+b") as image:
        image.write(boot_sector("image B"))
    digest = hashlib.sha256()
    with open(staging, "rb") as image:
        while block := image.read(16 * MiB):
            digest.update(block)
    sha = digest.hexdigest()
    staging.rename(state.image_path(sha))
    return sha


def define_guest(conn: Any, directory: Path, pool: Pool, volume: Any, fmt: str) -> str:
    name = f"{DOMAIN_PREFIX}bench-{uuid.uuid4().hex[:6]}"
    if pool.kind == "disk":
        disk = (
            "<disk type='block' device='disk'><driver name='qemu' type='raw'/>"
            f"<source dev='{volume.path()}'/>"
        )
    else:
        disk = (
            f"<disk type='volume' device='disk'><driver name='qemu' type='{fmt}'/>"
            f"<source pool='{pool.name}' volume='{volume.name()}'/>"
        )
    devices = disk + "<target dev='vda' bus='virtio'/><boot order='1'/></disk>"
    conn.defineXML(shaped_domain_xml(name, directory / f"{name}.log", devices, domain_type=DOMAIN_TYPE))
    conn.lookupByName(name).create()
    return name


def bare_floor(conn: Any, name: str) -> float:
    """Off → running of the same guest with nothing changed: a destroy, then the start timed."""
    domain = conn.lookupByName(name)
    domain.destroy()
    with timed() as start:
        domain.create()
    return start[0]


async def rebuild(name: str, state: StateDir, sha: str, size: int) -> tuple[float, float, float, str]:
    """(stage, prepare, off → running, how stage made the disk) through the real activities."""
    conn = Libvirt(LIBVIRT_URI)
    hypervisor, disks, env = HypervisorActivities(conn), DiskActivities(conn, state), ActivityEnvironment()
    common = {"instance": name, "rebuild_id": f"bench-{uuid.uuid4().hex[:8]}", "image_sha256": sha,
              "image_format": "raw", "image_virtual_size": size}  # fmt: skip
    with timed() as staging:
        staged = await env.run(disks.stage_root_disk, StageRootDiskInput(**common))
    await env.run(hypervisor.stop_instance, StopInstanceInput(instance=name, timeout_seconds=0))
    with timed() as off:
        with timed() as swap:
            await env.run(disks.prepare_root_disk, PrepareRootDiskInput(**common, original_format="raw"))
        await env.run(hypervisor.start_instance, StartInstanceInput(instance=name))
    conn.close()
    return staging[0], swap[0], off[0], staged.mode


def upload_against_convert(conn: Any, directory: Path, image: Path) -> tuple[float, float]:
    pool = make_pool(conn, directory, "dir", image.stat().st_size)
    try:
        storage = StoragePool(Libvirt(LIBVIRT_URI), pool.name)
        volume = storage.create(
            f"<volume><name>up.raw</name><capacity>{image.stat().st_size}</capacity></volume>"
        )
        with timed() as uploading:
            volume.upload(image)
        target = Path(storage.info().target) / "converted.raw"
        with timed() as converting:
            command = ["qemu-img", "convert", "-q", "-f", "raw", "-O", "raw", str(image), str(target)]
            subprocess.run(command, check=True)
    finally:
        remove_pool(pool)
    return uploading[0], converting[0]


def main() -> None:
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    conn = libvirt.open(LIBVIRT_URI)
    rows: list[tuple[str, str, str, str]] = []
    with reachable_dir("bench-pools-") as tmp:
        workdir = Path(tmp)
        for size in SIZES:
            state = StateDir(workdir / f"state-{size}")
            sha = cached_image(state, size)
            for kind, fmt in KINDS:
                pools: dict[str, Pool] = {}
                directory = workdir / f"{kind}-{size}"
                directory.mkdir()
                name = ""
                try:
                    pool, volume = root_volume(conn, directory, pools, kind, fmt, size)
                    name = define_guest(conn, directory, pool, volume, fmt)
                    floor = bare_floor(conn, name)
                    stage, swap, off, how = asyncio.run(rebuild(name, state, sha, size))
                finally:
                    if name:
                        domain = conn.lookupByName(name)
                        if domain.isActive():
                            domain.destroy()
                        domain.undefine()
                    for made in pools.values():
                        remove_pool(made)
                label = f"{kind} pool, {fmt}, {size // MiB} MiB"
                rows.append((f"{label}: stage ({how})", f"{stage:.2f} s", "before the stop", ""))
                rows.append((f"{label}: prepare (the swap)", f"{swap * 1000:.0f} ms", "", ""))
                floor_text = f"bare start after a destroy: {floor:.2f} s"
                rows.append(
                    (f"{label}: downtime, off → running", f"{off:.2f} s", floor_text, f"{off / floor:.2f}x")
                )
        up, converted = upload_against_convert(conn, workdir, state.image_path(sha))
        reference = f"qemu-img convert into the pool: {converted:.2f} s"
        label = f"pool copy of a {SIZES[-1] // MiB} MiB image: libvirt upload"
        rows.append((label, f"{up:.2f} s", reference, f"{up / converted:.2f}x"))
    table("Root disks in storage pools, real libvirtd guest", rows)


if __name__ == "__main__":
    main()
