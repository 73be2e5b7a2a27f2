"""File root disks rebuilt in copy mode, on a real libvirtd with boot-sector guests.

A raw root stays raw and a qcow2 root gets a standalone qcow2 file (no backing file, nothing in the
cache needed); the console proves image B booted. On an XFS file system with reflinks that holds both
the worker's image cache and the disk, the copy is a reflink (its extents are the cached image's); on
the test machine's ext4 it is a full copy. A bad image is rolled back to the old disk (image A boots
again), and a worker killed at each kill point leaves a rebuild that finishes.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from temporalio.client import Client

from devtools.guest import write_image
from devtools.image_server import ImageServer
from devtools.temporal_dev import DevServer
from devtools.testbed.e2e import WorkerProcess, rebuild_cli, serve
from devtools.testbed.pools import shared_bytes, xfs_mount
from devtools.testbed.shapes import Bed, Shaped, disk_of, disk_xml
from tests.test_disks import info

DISK_BYTES = 4 << 20


@pytest.fixture
def xfs_bed(
    libvirt_conn: Any, reachable_tmp: Path, tmp_path: Path, dev_server: DevServer, images: ImageServer
) -> Iterator[Bed]:
    """Guests whose disks lie on an XFS loop file system with reflinks, and a worker whose state
    (its image cache) is on the same file system and whose default disk mode is copy."""
    with xfs_mount(reachable_tmp) as xfs:
        pause_dir = tmp_path / "pause"
        pause_dir.mkdir()
        worker = WorkerProcess(
            host=f"test-{uuid.uuid4().hex[:10]}",
            state_dir=xfs / "host-state",
            address=dev_server.address,
            log=tmp_path / "worker.log",
            pause_dir=pause_dir,
            extra_args=("--disk-mode", "copy"),
        )
        worker.start()
        guests = xfs / "guests"
        guests.mkdir()
        os.chmod(guests, 0o711)
        bed = Bed(libvirt_conn, guests, worker, images, dev_server)
        try:
            yield bed
        finally:
            bed.remove_guests()
            worker.stop()


def file_guest(bed: Bed, fmt: str) -> Shaped:
    root = write_image(
        bed.directory / f"root-{uuid.uuid4().hex[:6]}.{fmt}", "image A", fmt=fmt, size=DISK_BYTES
    )
    return bed.define(root, disk_xml(root, "vda", fmt, extra="<boot order='1'/>"))


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_standalone(guest: Shaped, fmt: str) -> None:
    """The root disk is a file in ``fmt`` with no backing file, and the definition names no chain."""
    found = info(guest.root)
    assert found["format"] == fmt, found
    assert "backing-filename" not in found and "full-backing-filename" not in found, found
    assert found["virtual-size"] == DISK_BYTES
    disk = disk_of(guest.definition(), "vda")
    driver = disk.find("driver")
    assert driver is not None and driver.get("type") == fmt
    assert disk.find("backingStore/source") is None


async def rolled_back_by_a_bad_image(bed: Bed, guest: Shaped, *extra: str) -> None:
    """Image C never prints the marker: the old disk, byte for byte, is back and boots image A."""
    before, old = guest.definition(), digest(guest.root)
    url, sha = bed.serve("image C", "raw")
    result = await bed.rebuild(guest, url, sha, *extra)
    assert result.code == 1, result.stderr
    assert "rolled back" in result.stderr, result.stderr
    assert "image C" in guest.console(), result.stderr
    guest.wait_for_console("image A", after=guest.console().index("image C"))
    assert guest.definition() == before
    assert digest(guest.root) == old
    assert list(guest.root.parent.glob(f"{guest.root.name}.rebuild-*")) == []


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
async def test_a_file_root_in_copy_mode_keeps_its_format_and_boots_image_b(bed: Bed, fmt: str) -> None:
    guest = file_guest(bed, fmt)
    await rolled_back_by_a_bad_image(bed, guest, "--disk-mode", "copy")

    url, sha = bed.serve("image B", "raw")
    rebuilt = await bed.rebuild(guest, url, sha, "--disk-mode", "copy", "--json")

    assert rebuilt.code == 0, rebuilt.stderr
    console = guest.console()
    assert console.rindex("image B") > console.rindex("image A")
    assert rebuilt.json()["disk_mode"] == "copy (full)", "ext4 has no reflinks"
    assert_standalone(guest, fmt)
    assert list(guest.root.parent.glob(f"{guest.root.name}.rebuild-*")) == [], "the backup went at cleanup"
    status = await rebuild_cli(bed.server.address, "status", guest.name, "--host", bed.worker.host, "--json")
    assert status.code == 0, status.stderr
    assert "copy (full)" in status.stdout
    human = await rebuild_cli(bed.server.address, "status", guest.name, "--host", bed.worker.host)
    assert "disk mode: copy (full)" in human.stdout, human.stdout


async def test_on_xfs_the_worker_default_makes_a_reflink_of_the_cached_image(xfs_bed: Bed) -> None:
    bed = xfs_bed
    guest = file_guest(bed, "raw")
    await rolled_back_by_a_bad_image(bed, guest)

    url, sha = bed.serve("image B", "raw")
    rebuilt = await bed.rebuild(guest, url, sha, "--json")  # no --disk-mode: the worker's copy

    assert rebuilt.code == 0, rebuilt.stderr
    console = guest.console()
    assert console.rindex("image B") > console.rindex("image A")
    assert rebuilt.json()["disk_mode"] == "copy (reflink)"
    assert_standalone(guest, "raw")
    cached = bed.cache / sha
    assert shared_bytes(guest.root) > 0, "the disk's extents are the cached image's"
    assert shared_bytes(guest.root) == shared_bytes(cached) == cached.stat().st_blocks * 512

    overlay = await bed.rebuild(guest, url, sha, "--disk-mode", "overlay", "--json")
    assert overlay.code == 0, overlay.stderr
    assert overlay.json()["disk_mode"] == "overlay", "the request's mode wins over the worker's"
    assert info(guest.root)["backing-filename"] == str(cached)


async def test_on_xfs_a_qcow2_root_from_a_qcow2_image_is_a_reflink_grown_to_the_old_size(
    xfs_bed: Bed,
) -> None:
    bed = xfs_bed
    guest = file_guest(bed, "qcow2")
    url, sha = serve(bed.images, "image B", "qcow2", size=1 << 20)  # smaller than the 4 MiB disk

    rebuilt = await bed.rebuild(guest, url, sha, "--json")

    assert rebuilt.code == 0, rebuilt.stderr
    guest.wait_for_console("image B")
    assert rebuilt.json()["disk_mode"] == "copy (reflink)"
    assert_standalone(guest, "qcow2")
    assert shared_bytes(guest.root) > 0, "the qcow2 file shares the cached image's extents"


@pytest.mark.parametrize("point", ["stage.after-write", "prepare.after-new-disk", "cleanup.before-remove"])
async def test_a_worker_killed_at_each_kill_point_leaves_a_copy_mode_rebuild_that_finishes(
    xfs_bed: Bed, client: Client, point: str
) -> None:
    bed = xfs_bed
    guest = file_guest(bed, "raw")
    result = await bed.rebuild_killed_at(client, guest, point)

    assert result["outcome"] == "rebuilt", result
    assert result["disk_mode"] == "copy (reflink)"
    guest.wait_for_console("image B")
    assert_standalone(guest, "raw")
    assert shared_bytes(guest.root) > 0
    assert list(guest.root.parent.glob(f"{guest.root.name}.rebuild-*")) == []
