"""Copy mode for file root disks, with real qemu-img on real files (ext4 here, and an XFS loop file
system with reflinks); the instance lives on libvirt's test driver.

A copy is a standalone disk in the instance's own format, staged while it runs; prepare only links and
renames it, a retry never copies again, verify knows the very file, and the worker's default applies
where the request names no mode.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from temporalio.client import Client
from temporalio.testing import ActivityEnvironment

from activities import domain_xml as dx
from activities.disks import DiskActivities
from activities.errors import BootCheckFailed, DiskMissing, InvalidRequest
from activities.root_disks import RootDiskAt
from activities.state import StateDir, backup_path
from devtools.temporal_dev import DevServer
from devtools.testbed.e2e import BIN, rebuild_cli
from devtools.testbed.fake_host import FakeHost
from devtools.testbed.libvirt_test_driver import DriverInstance, make_instance
from devtools.testbed.pools import shared_bytes, xfs_mount
from tests.api_support import AUTH
from tests.test_disks import REBUILD_ID, cached_image, info, prepare_input, root_format
from tests.workflow_support import rebuilding
from workflows.fleet_models import FleetTarget, StrictRebuildOptions
from workflows.models import (
    RemoveBackupInput,
    RestoreRootDiskInput,
    StageRootDiskInput,
    VerifyInstanceInput,
)
from workflows.rebuild import RebuildInstance

env = ActivityEnvironment()
DISK_BYTES = 8 << 20


def stage_input(sha: str, size: int, mode: str | None, fmt: str = "qcow2") -> StageRootDiskInput:
    return StageRootDiskInput(
        instance="vm-1",
        rebuild_id=REBUILD_ID,
        image_sha256=sha,
        image_format=fmt,
        image_virtual_size=size,
        disk_mode=mode,
    )


def raw_image(state: StateDir, marker: str = "new image", dense: bool = False) -> tuple[str, int]:
    """A raw image in the cache (``cached_image`` makes qcow2 ones); ``dense``: every byte written."""
    sha, size = cached_image(state, marker)
    image, raw = state.image_path(sha), state.root / "staging.raw"
    subprocess.run(
        ["qemu-img", "convert", "-q", "-f", "qcow2", "-O", "raw", str(image), str(raw)], check=True
    )
    if dense:
        with open(raw, "r+b") as dense_image:
            dense_image.seek(512)
            dense_image.write(os.urandom(size - 512))
    raw_sha = hashlib.sha256(raw.read_bytes()).hexdigest()
    raw.rename(state.image_path(raw_sha))
    return raw_sha, size


def same_guest_bytes(image: Path, image_fmt: str, disk: Path) -> bool:
    """The disk shows the guest the image's bytes (the rest, where it grew, reads as zeroes)."""
    compared = subprocess.run(
        ["qemu-img", "compare", "-q", "-f", image_fmt, "-F", "raw", str(image), str(disk)], check=False
    )
    return compared.returncode == 0


def verify_input(sha: str) -> VerifyInstanceInput:
    return VerifyInstanceInput(
        instance="vm-1", root_disk_target="vda", image_sha256=sha, rebuild_id=REBUILD_ID
    )


def root_of(disks: DiskActivities, vm: DriverInstance) -> RootDiskAt:
    domain = disks.libvirt.domain(vm.name)
    xml = domain.definition()
    return RootDiskAt(domain, xml, dx.root_disk(xml, vm.name, "vda"))


@pytest.fixture
def setup(tmp_path: Path) -> tuple[DriverInstance, StateDir, DiskActivities]:
    vm = make_instance(tmp_path, running=True, disk_size=DISK_BYTES)
    state = StateDir(tmp_path / "state")
    return vm, state, DiskActivities(vm.libvirt, state)


def stop(vm: DriverInstance) -> None:
    domain = vm.libvirt.connection().lookupByName(vm.name)
    if domain.isActive():
        domain.destroy()


async def copied_in(vm: DriverInstance, state: StateDir, disks: DiskActivities) -> str:
    """A raw image's copy staged while ``vm`` runs and put in place after its stop; the image."""
    sha, size = raw_image(state)
    await env.run(disks.stage_root_disk, stage_input(sha, size, "copy", "raw"))
    stop(vm)
    await env.run(disks.prepare_root_disk, prepare_input(sha, size))
    return sha


async def test_a_raw_disk_in_copy_mode_stays_raw_and_prepare_only_renames_the_staged_copy(
    setup: tuple[DriverInstance, StateDir, DiskActivities],
) -> None:
    vm, state, disks = setup
    old_bytes = vm.disk.read_bytes()
    sha, size = raw_image(state)

    staged = await env.run(disks.stage_root_disk, stage_input(sha, size, "copy", "raw"))
    assert staged.mode == "copy (full)", "the test's ext4 has no reflinks"
    assert vm.disk.read_bytes() == old_bytes, "the running instance's disk is untouched"
    again = await env.run(disks.stage_root_disk, stage_input(sha, size, "copy", "raw"))
    assert again == staged
    inode = os.stat(staged.staged_at).st_ino
    assert os.stat(staged.staged_at).st_blocks * 512 < DISK_BYTES // 2, "sparse where the image is"

    stop(vm)
    prepared = await env.run(disks.prepare_root_disk, prepare_input(sha, size))
    assert os.stat(vm.disk).st_ino == inode, "the staged copy, renamed: nothing copied in the downtime"
    new = info(vm.disk)
    assert new["format"] == "raw" and "backing-filename" not in new
    assert new["virtual-size"] == DISK_BYTES == prepared.virtual_size
    assert same_guest_bytes(state.image_path(sha), "raw", vm.disk)
    assert root_format(vm) == "raw"
    assert Path(prepared.backup_path).read_bytes() == old_bytes

    # A retry after the swap (the worker died after the rename) finds the copy in place.
    await env.run(disks.prepare_root_disk, prepare_input(sha, size))
    assert os.stat(vm.disk).st_ino == inode
    assert Path(prepared.backup_path).read_bytes() == old_bytes


async def test_a_qcow2_image_is_converted_for_a_raw_disk(
    setup: tuple[DriverInstance, StateDir, DiskActivities],
) -> None:
    vm, state, disks = setup
    sha, size = cached_image(state)
    staged = await env.run(disks.stage_root_disk, stage_input(sha, size, "copy"))
    assert staged.mode == "copy (full)"
    stop(vm)
    await env.run(disks.prepare_root_disk, prepare_input(sha, size))
    new = info(vm.disk)
    assert new["format"] == "raw" and "backing-filename" not in new
    assert vm.disk.read_bytes()[:4] != b"QFI\xfb"
    assert same_guest_bytes(state.image_path(sha), "qcow2", vm.disk)
    assert root_format(vm) == "raw"


async def test_verify_knows_the_staged_copy_from_a_file_with_the_same_bytes(
    setup: tuple[DriverInstance, StateDir, DiskActivities],
) -> None:
    vm, state, disks = setup
    sha = await copied_in(vm, state, disks)
    backend = disks.backend(root_of(disks, vm))

    said = await backend.running_on_new_disk(root_of(disks, vm), verify_input(sha))
    assert "standalone raw copy" in said

    twin = vm.disk.with_name("twin")
    twin.write_bytes(vm.disk.read_bytes())
    os.replace(twin, vm.disk)
    with pytest.raises(BootCheckFailed, match="not as the standalone raw copy"):
        await backend.running_on_new_disk(root_of(disks, vm), verify_input(sha))


async def test_restore_puts_the_old_disk_back_and_cleanup_keeps_the_copy(
    setup: tuple[DriverInstance, StateDir, DiskActivities],
) -> None:
    vm, state, disks = setup
    old_bytes = vm.disk.read_bytes()
    sha = await copied_in(vm, state, disks)
    restore = RestoreRootDiskInput(
        instance="vm-1", rebuild_id=REBUILD_ID, original_format="raw", image_sha256=sha
    )
    await env.run(disks.restore_root_disk, restore)
    await env.run(disks.restore_root_disk, restore)
    assert vm.disk.read_bytes() == old_bytes
    assert list(vm.disk.parent.glob("*.rebuild-*")) == []

    await copied_in(vm, state, disks)
    copy = os.stat(vm.disk).st_ino
    await env.run(disks.remove_backup, RemoveBackupInput(instance="vm-1", rebuild_id=REBUILD_ID))
    assert os.stat(vm.disk).st_ino == copy
    assert not backup_path(str(vm.disk), REBUILD_ID).exists()
    assert list(vm.disk.parent.glob("*.rebuild-*")) == []


async def test_restore_refuses_a_copy_in_place_without_its_backup(
    setup: tuple[DriverInstance, StateDir, DiskActivities],
) -> None:
    vm, state, disks = setup
    await copied_in(vm, state, disks)
    backup_path(str(vm.disk), REBUILD_ID).unlink()  # lost by hand
    restore = RestoreRootDiskInput(instance="vm-1", rebuild_id=REBUILD_ID, original_format="raw")
    with pytest.raises(DiskMissing, match="standalone copy this rebuild made"):
        await env.run(disks.restore_root_disk, restore)


async def test_the_worker_default_applies_where_the_request_names_no_mode(tmp_path: Path) -> None:
    vm = make_instance(tmp_path, running=True, disk_size=DISK_BYTES)
    state = StateDir(tmp_path / "state")
    disks = DiskActivities(vm.libvirt, state, default_disk_mode="copy")
    sha, size = raw_image(state)

    assert (await env.run(disks.stage_root_disk, stage_input(sha, size, None, "raw"))).mode == "copy (full)"
    overlay = await env.run(disks.stage_root_disk, stage_input(sha, size, "overlay", "raw"))
    assert overlay.mode == "overlay"
    assert info(Path(overlay.staged_at))["format"] == "qcow2"
    with pytest.raises(InvalidRequest, match="overlay or copy, not 'inplace'"):
        await env.run(disks.stage_root_disk, stage_input(sha, size, "inplace", "raw"))
    with pytest.raises(InvalidRequest):
        DiskActivities(vm.libvirt, state, default_disk_mode="bogus")


async def test_on_xfs_the_copy_is_a_reflink_of_the_cached_image(tmp_path: Path) -> None:
    with xfs_mount(tmp_path) as xfs:
        vm = make_instance(xfs, running=True, disk_size=DISK_BYTES)
        state = StateDir(xfs / "state")
        disks = DiskActivities(vm.libvirt, state)
        sha, size = raw_image(state, dense=True)
        image = state.image_path(sha)
        assert shared_bytes(image) == 0

        staged = await env.run(disks.stage_root_disk, stage_input(sha, size, "copy", "raw"))

        assert staged.mode == "copy (reflink)"
        assert shared_bytes(Path(staged.staged_at)) == image.stat().st_size, "every extent shared"
        assert shared_bytes(image) > 0
        assert same_guest_bytes(image, "raw", Path(staged.staged_at))
        assert os.stat(staged.staged_at).st_size == DISK_BYTES


async def test_a_cache_on_another_file_system_gets_a_full_copy(tmp_path: Path) -> None:
    with xfs_mount(tmp_path) as xfs:
        vm = make_instance(xfs, running=True, disk_size=DISK_BYTES)
        state = StateDir(tmp_path / "state")  # ext4: not where the disk is
        disks = DiskActivities(vm.libvirt, state)
        sha, size = raw_image(state)

        staged = await env.run(disks.stage_root_disk, stage_input(sha, size, "copy", "raw"))

        assert staged.mode == "copy (full)"
        assert shared_bytes(Path(staged.staged_at)) == 0
        assert same_guest_bytes(state.image_path(sha), "raw", Path(staged.staged_at))


# --- the mode at the edges: the CLI, the API, the worker --------------------------------------------


async def test_a_bad_disk_mode_is_refused_by_the_cli_before_anything_starts(dev_server: DevServer) -> None:
    refused = await rebuild_cli(
        dev_server.address,
        "start",
        "vm-1",
        "--image",
        "http://images.example/b.img",
        "--disk-mode",
        "inplace",
    )
    assert refused.code == 2, refused.stderr
    assert "disk mode must be overlay or copy, not 'inplace'" in refused.stderr
    assert "Traceback" not in refused.stderr


async def test_a_bad_disk_mode_is_400_from_the_api(api: TestClient[Any, Any], unique_host: str) -> None:
    body = {"instance": "vm-1", "host": unique_host, "image_url": "http://x/y", "disk_mode": "inplace"}
    response = await api.post("/v1/rebuilds", json=body, headers=AUTH)
    assert response.status == 400
    assert "disk mode must be overlay or copy" in (await response.json())["error"]


def test_the_worker_refuses_a_bad_default_disk_mode(tmp_path: Path) -> None:
    for args in (["--disk-mode", "inplace"], []):
        done = subprocess.run(
            [str(BIN / "rebuild-worker"), "--address", "127.0.0.1:1", "--state-dir", str(tmp_path), *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            env={**os.environ, "REBUILD_DISK_MODE": "inplace"},
        )
        assert done.returncode == 2, done.stderr
        assert "--disk-mode must be overlay or copy, not 'inplace'" in done.stderr
        assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    ("requested", "worker_default", "used"),
    [
        (None, "copy", "copy"),
        ("overlay", "copy", "overlay"),
        ("copy", "overlay", "copy"),
        (None, "overlay", "overlay"),
    ],
)
async def test_the_request_names_the_mode_else_the_host_worker_decides_and_status_says_which(
    client: Client, unique_host: str, requested: str | None, worker_default: str, used: str
) -> None:
    fake = FakeHost()
    fake.disk_mode = worker_default
    async with rebuilding(client, unique_host, fake, disk_mode=requested) as handle:
        result = await handle.result()
        status = await handle.query(RebuildInstance.status)
    assert fake.staged_modes == [requested], "the workflow passes the request's word, None included"
    assert result.disk_mode == status.disk_mode == used


async def test_a_fleet_passes_its_disk_mode_to_every_rebuild_and_refuses_a_bad_one(
    dev_server: DevServer,
) -> None:
    options = StrictRebuildOptions(image_url="http://x/y", disk_mode="copy")
    assert options.request_for(FleetTarget(host="h", instance="i")).disk_mode == "copy"
    refused = await rebuild_cli(
        dev_server.address, "fleet", "start", "--image", "http://x/y", "--select", "*", "--host", "h",
        "--disk-mode", "inplace",
    )  # fmt: skip
    assert refused.code == 2, refused.stderr
    assert "disk mode must be overlay or copy, not 'inplace'" in refused.stderr
    assert "Traceback" not in refused.stderr
