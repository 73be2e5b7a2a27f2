"""Root disks in libvirt storage pools, on a real libvirtd with boot-sector guests.

A dir pool, an fs pool on an XFS loop device (its raw volumes are reflinked), and a disk pool on a
loop device whose partitions are block devices. Each root disk is rebuilt (the console proves image B
booted, the disk names the new volume, the old volume is gone after cleanup), rolled back by an image
that does not boot (the old volume, byte for byte, boots again), and resumed after a worker is killed
at each kill point. A block device no pool manages is refused before the stop.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from temporalio.client import Client

from devtools.guest import write_image
from devtools.testbed.e2e import rebuild_cli
from devtools.testbed.pools import VOLUME_BYTES, Pool, guest_on, losetup, remove_pool, root_volume
from devtools.testbed.shapes import Bed, Shaped, assert_refused_before_stop, disk_of


@pytest.fixture
def pools(libvirt_conn: Any, guest_dir: Path) -> Iterator[dict[str, Pool]]:
    """The pools a test made (root_volume fills it), removed after it with their loop devices."""
    made: dict[str, Pool] = {}
    yield made
    for pool in made.values():
        remove_pool(pool)


def digest(path: str) -> str:
    with open(path, "rb") as disk:
        return hashlib.sha256(disk.read(VOLUME_BYTES)).hexdigest()


def named_volume(definition: str) -> str:
    source = disk_of(definition, "vda").find("source")
    assert source is not None
    return str(source.get("volume") or Path(str(source.get("dev"))).name)


SHAPES = [("dir", "qcow2"), ("dir", "raw"), ("fs", "raw"), ("disk", "raw")]


@pytest.mark.parametrize(("kind", "fmt"), SHAPES)
async def test_a_pool_volume_root_is_rebuilt_and_rolled_back(
    bed: Bed, pools: dict[str, Pool], kind: str, fmt: str
) -> None:
    pool, volume = root_volume(bed.conn, bed.directory, pools, kind, fmt)
    guest = guest_on(bed, pool, volume, fmt)
    old_name, old_digest = volume.name(), digest(volume.path())
    before = guest.definition()

    bad_url, bad_sha = bed.serve("image C", "raw")
    rolled_back = await bed.rebuild(guest, bad_url, bad_sha)
    assert rolled_back.code == 1, rolled_back.stderr
    assert "rolled back" in rolled_back.stderr, rolled_back.stderr
    assert "image C" in guest.console(), rolled_back.stderr
    guest.wait_for_console("image A", after=guest.console().index("image C"))
    assert guest.definition() == before
    assert digest(volume.path()) == old_digest, "the old volume is the one that boots again"
    assert pool.names() - {n for n in pool.names() if n.startswith("rebuild-image-")} == {old_name}

    url, sha = bed.serve("image B", "raw")
    # Pre-flight too, once: its sandbox gets a throwaway file overlay, never the instance's volume.
    preflight = ("--preflight",) if (kind, fmt) == ("dir", "raw") else ()
    rebuilt = await bed.rebuild(guest, url, sha, "--json", *preflight)
    assert rebuilt.code == 0, rebuilt.stderr
    console = guest.console()
    assert console.rindex("image B") > console.rindex("image A")
    new_name = named_volume(guest.definition())
    assert new_name != old_name
    assert old_name not in pool.names(), "the old volume went at cleanup"
    disk = disk_of(guest.definition(), "vda")
    driver = disk.find("driver")
    assert driver is not None and driver.get("type") == fmt
    assert disk.get("type") == ("block" if kind == "disk" else "volume")
    assert "volume" in str(rebuilt.json()["disk_mode"])
    if preflight:
        assert "preflight" in rebuilt.json()["step_seconds"]
    if kind == "fs":
        assert "reflink" in str(rebuilt.json()["disk_mode"])
    await the_pool_copy_is_counted_and_kept_while_a_volume_needs_it(bed, guest, pool, sha, fmt)


@pytest.mark.parametrize(("kind", "fmt"), [("dir", "qcow2"), ("disk", "raw")])
async def test_a_dry_run_names_the_volume_back_end_and_leaves_pool_and_guest_as_they_were(
    bed: Bed, pools: dict[str, Pool], kind: str, fmt: str
) -> None:
    pool, volume = root_volume(bed.conn, bed.directory, pools, kind, fmt)
    guest = guest_on(bed, pool, volume, fmt)
    before = (guest.definition(), pool.names(), digest(volume.path()), guest.domain.isActive())
    assert before[3], "the guest runs"
    url, sha = bed.serve("image B", "raw")
    planned = await bed.rebuild(guest, url, sha, "--dry-run", "--json")
    assert planned.code == 0, planned.stderr
    disk = planned.json()["root_disk"]
    assert disk["kind"] == ("block" if kind == "disk" else "volume")
    how = "qcow2 volume on the pool's copy" if fmt == "qcow2" else "raw volume written from the image"
    assert disk["mode"].startswith(f"volume: {how}") and disk["mode"].endswith(f"in pool {pool.name}")
    assert (guest.definition(), pool.names(), digest(volume.path()), guest.domain.isActive()) == before


async def the_pool_copy_is_counted_and_kept_while_a_volume_needs_it(
    bed: Bed, guest: Shaped, pool: Pool, sha: str, fmt: str
) -> None:
    """One copy of the image per pool (a disk pool keeps none: it cannot name one), listed by `rebuild
    cache list`; a qcow2 volume backed by it keeps it from `rebuild cache prune`, a copy nothing needs
    goes, and the instance's volume is never touched."""
    common = ["--state-dir", str(bed.worker.state_dir), "--libvirt-uri", "qemu:///system", "--json"]
    listed = await rebuild_cli(bed.server.address, "cache", "list", *common)
    assert listed.code == 0, listed.stderr
    copies = [e for e in json.loads(listed.stdout) if e["where"] == f"pool {pool.name}"]
    if pool.kind == "disk":
        assert copies == []
        return
    users = {c["sha256"]: c["users"] for c in copies}
    assert len(users) == 2, "image B's, and image C's from the rolled-back attempt"
    assert users.pop(sha) == ([guest.name] if fmt == "qcow2" else [])
    assert list(users.values()) == [[]]
    root = named_volume(guest.definition())
    pruned = await rebuild_cli(bed.server.address, "cache", "prune", "--max-age-days", "0", *common)
    assert pruned.code == 0, pruned.stderr
    left = {n for n in pool.names() if n.startswith("rebuild-image-")}
    assert left == ({f"rebuild-image-{sha[:16]}.raw"} if fmt == "qcow2" else set())
    assert root in pool.names()


@pytest.mark.parametrize("point", ["stage.after-write", "prepare.after-new-disk", "cleanup.before-remove"])
@pytest.mark.parametrize(("kind", "fmt"), [("dir", "qcow2"), ("fs", "raw"), ("disk", "raw")])
async def test_a_worker_killed_at_each_kill_point_leaves_a_rebuild_that_finishes(
    bed: Bed, pools: dict[str, Pool], client: Client, point: str, kind: str, fmt: str
) -> None:
    pool, volume = root_volume(bed.conn, bed.directory, pools, kind, fmt)
    guest = guest_on(bed, pool, volume, fmt)
    result = await bed.rebuild_killed_at(client, guest, point)

    assert result["outcome"] == "rebuilt"
    guest.wait_for_console("image B")
    assert named_volume(guest.definition()) != volume.name()
    assert {n for n in pool.names() if not n.startswith("rebuild-image-")} == {
        named_volume(guest.definition())
    }


async def test_a_block_device_no_pool_manages_is_refused_before_the_stop(bed: Bed) -> None:
    backing = bed.directory / "lonely.img"
    write_image(backing, "image A", size=VOLUME_BYTES)
    loop = losetup(backing)
    try:
        devices = (
            f"<disk type='block' device='disk'><driver name='qemu' type='raw'/><source dev='{loop}'/>"
            "<target dev='vda' bus='virtio'/><boot order='1'/></disk>"
        )
        guest = bed.define(backing, devices)
        before, sums, domain_id = guest.definition(), guest.checksums(), guest.domain.ID()
        url, sha = bed.serve("image B", "raw")

        result = await bed.rebuild(guest, url, sha)

        assert_refused_before_stop(
            result, guest, before, sums, domain_id, "belongs to no libvirt storage pool"
        )
        assert "define a pool for it" in result.stderr
    finally:
        bed.remove_guests()
        subprocess.run(["losetup", "-d", loop], check=False)
