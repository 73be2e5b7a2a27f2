"""Disk activities with real qemu-img on real files; the instance lives on libvirt's test driver."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import pytest
from temporalio.testing import ActivityEnvironment

from activities.checkpoints import Checkpoints
from activities.cleanup import CleanupActivities
from activities.disks import DiskActivities
from activities.errors import DiskMissing, InstanceNotStopped
from activities.hypervisor import HypervisorActivities
from activities.state import StateDir, backup_path
from activities.swap import SwapActivities
from devtools.guest import write_image
from devtools.testbed.libvirt_test_driver import DriverInstance, make_instance
from workflows.models import (
    CleanUpInput,
    DiscardStagedRootDiskInput,
    PrepareRootDiskInput,
    RecordImageInput,
    RemoveBackupInput,
    RestoreRootDiskInput,
    StageRootDiskInput,
    StartInstanceInput,
    StopInstanceInput,
    SwapRootDiskInput,
)

env = ActivityEnvironment()
REBUILD_ID = "0b9f2f0e-run"
T0 = datetime(2026, 12, 3, tzinfo=UTC)


def cached_image(state: StateDir, marker: str = "new image", size: int = 1 << 20) -> tuple[str, int]:
    state.create()
    staging = write_image(state.root / "staging.qcow2", marker, fmt="qcow2", size=size)
    sha = hashlib.sha256(staging.read_bytes()).hexdigest()
    staging.rename(state.image_path(sha))
    return sha, size


def info(path: Path) -> dict[str, object]:
    out = subprocess.run(
        ["qemu-img", "info", "-U", "--output=json", str(path)], check=True, capture_output=True, text=True
    ).stdout
    result: dict[str, object] = json.loads(out)
    return result


def root_format(vm: DriverInstance) -> str:
    xml = vm.libvirt.connection().lookupByName(vm.name).XMLDesc(0)
    return "qcow2" if "type='qcow2'" in xml.split("<target dev='vda'")[0].rsplit("<disk", 1)[1] else "raw"


def prepare_input(sha: str, size: int) -> PrepareRootDiskInput:
    return PrepareRootDiskInput(
        instance="vm-1",
        image_sha256=sha,
        image_format="qcow2",
        image_virtual_size=size,
        original_format="raw",
        rebuild_id=REBUILD_ID,
    )


@pytest.fixture
def setup(tmp_path: Path) -> tuple[DriverInstance, StateDir, DiskActivities]:
    vm = make_instance(tmp_path, running=False, disk_size=8 << 20)
    state = StateDir(tmp_path / "state")
    return vm, state, DiskActivities(vm.libvirt, state)


async def test_prepare_puts_an_overlay_in_place_and_keeps_the_old_disk(
    setup: tuple[DriverInstance, StateDir, DiskActivities],
) -> None:
    vm, state, disks = setup
    old_bytes = vm.disk.read_bytes()
    data_before = vm.data_disk.read_bytes()
    os.chmod(vm.disk, 0o640)
    sha, size = cached_image(state)
    prepared = await env.run(disks.prepare_root_disk, prepare_input(sha, size))
    overlay = info(vm.disk)
    assert overlay["format"] == "qcow2"
    assert overlay["backing-filename"] == str(state.image_path(sha))
    # Grown to the old disk's 8 MiB, though the image is 1 MiB.
    assert overlay["virtual-size"] == 8 << 20
    assert prepared.virtual_size == 8 << 20
    assert Path(prepared.backup_path).read_bytes() == old_bytes
    assert root_format(vm) == "qcow2"
    assert vm.data_disk.read_bytes() == data_before
    assert os.stat(vm.disk).st_mode & 0o777 == 0o640


async def test_prepare_twice_never_overwrites_the_backup(
    setup: tuple[DriverInstance, StateDir, DiskActivities],
) -> None:
    vm, state, disks = setup
    old_bytes = vm.disk.read_bytes()
    sha, size = cached_image(state)
    await env.run(disks.prepare_root_disk, prepare_input(sha, size))
    again = await env.run(disks.prepare_root_disk, prepare_input(sha, size))
    assert Path(again.backup_path).read_bytes() == old_bytes
    assert info(vm.disk)["format"] == "qcow2"


async def test_prepare_finishes_after_a_crash_between_backup_and_swap(
    setup: tuple[DriverInstance, StateDir, DiskActivities],
) -> None:
    vm, state, disks = setup
    old_bytes = vm.disk.read_bytes()
    sha, size = cached_image(state)
    backup = backup_path(str(vm.disk), REBUILD_ID)
    os.link(vm.disk, backup)  # where a crashed first attempt stopped
    await env.run(disks.prepare_root_disk, prepare_input(sha, size))
    assert backup.read_bytes() == old_bytes
    assert info(vm.disk)["format"] == "qcow2"


async def test_prepare_refuses_a_running_instance(tmp_path: Path) -> None:
    vm = make_instance(tmp_path, running=True)
    state = StateDir(tmp_path / "state")
    sha, size = cached_image(state)
    with pytest.raises(InstanceNotStopped):
        await env.run(DiskActivities(vm.libvirt, state).prepare_root_disk, prepare_input(sha, size))
    assert info(vm.disk)["format"] == "raw"


async def test_restore_puts_the_old_disk_back_and_is_idempotent(
    setup: tuple[DriverInstance, StateDir, DiskActivities],
) -> None:
    vm, state, disks = setup
    old_bytes = vm.disk.read_bytes()
    sha, size = cached_image(state)
    prepared = await env.run(disks.prepare_root_disk, prepare_input(sha, size))
    restore = RestoreRootDiskInput(instance="vm-1", rebuild_id=REBUILD_ID, original_format="raw")
    await env.run(disks.restore_root_disk, restore)
    await env.run(disks.restore_root_disk, restore)
    assert vm.disk.read_bytes() == old_bytes
    assert root_format(vm) == "raw"
    assert not Path(prepared.backup_path).exists()


async def test_restore_after_a_crash_between_backup_and_swap(
    setup: tuple[DriverInstance, StateDir, DiskActivities],
) -> None:
    vm, _, disks = setup
    old_bytes = vm.disk.read_bytes()
    backup = backup_path(str(vm.disk), REBUILD_ID)
    os.link(vm.disk, backup)
    await env.run(
        disks.restore_root_disk,
        RestoreRootDiskInput(instance="vm-1", rebuild_id=REBUILD_ID, original_format="raw"),
    )
    assert vm.disk.read_bytes() == old_bytes
    assert not backup.exists()


async def test_remove_backup_keeps_the_new_disk(
    setup: tuple[DriverInstance, StateDir, DiskActivities],
) -> None:
    vm, state, disks = setup
    sha, size = cached_image(state)
    prepared = await env.run(disks.prepare_root_disk, prepare_input(sha, size))
    await env.run(disks.remove_backup, RemoveBackupInput(instance="vm-1", rebuild_id=REBUILD_ID))
    await env.run(disks.remove_backup, RemoveBackupInput(instance="vm-1", rebuild_id=REBUILD_ID))
    assert not Path(prepared.backup_path).exists()
    assert info(vm.disk)["format"] == "qcow2"
    assert list(vm.disk.parent.glob("*.rebuild-*")) == []


async def test_clean_up_in_one_step_removes_the_backup_and_records_the_image_and_can_run_again(
    setup: tuple[DriverInstance, StateDir, DiskActivities],
) -> None:
    vm, state, disks = setup
    sha, size = cached_image(state)
    hypervisor = HypervisorActivities(vm.libvirt, state=state)
    clean_up = CleanupActivities(hypervisor, disks).clean_up_rebuild
    prepared = await env.run(disks.prepare_root_disk, prepare_input(sha, size))
    request = CleanUpInput(
        remove=RemoveBackupInput(instance="vm-1", rebuild_id=REBUILD_ID),
        record=RecordImageInput(instance="vm-1", image_sha256=sha, image_url="http://x/y", rebuilt_at=T0),
    )
    await env.run(clean_up, request)
    await env.run(clean_up, request)  # a retry after a worker died once it was done
    assert not Path(prepared.backup_path).exists()
    assert info(vm.disk)["format"] == "qcow2"
    record = vm.libvirt.domain("vm-1").image_record()
    assert record is not None and record.get("sha256") == sha


async def test_restore_refuses_a_new_disk_whose_backup_is_not_there(
    setup: tuple[DriverInstance, StateDir, DiskActivities],
) -> None:
    """After a reset under a new run ID, "no backup" must not read as "already restored"."""
    vm, state, disks = setup
    sha, size = cached_image(state)
    prepared = await env.run(disks.prepare_root_disk, prepare_input(sha, size))
    other_run = RestoreRootDiskInput(
        instance="vm-1", rebuild_id="another-run", original_format="raw", image_sha256=sha
    )
    with pytest.raises(DiskMissing) as refused:
        await env.run(disks.restore_root_disk, other_run)
    assert str(vm.disk) in refused.value.message
    assert prepared.backup_path in refused.value.message
    assert str(backup_path(str(vm.disk), "another-run")) in refused.value.message
    # Nothing was touched: the new disk is in place, the old one still kept, the definition says qcow2.
    assert info(vm.disk)["format"] == "qcow2"
    assert Path(prepared.backup_path).exists()
    assert root_format(vm) == "qcow2"


async def test_restore_of_a_disk_never_replaced_on_an_earlier_rebuilds_overlay_succeeds(
    setup: tuple[DriverInstance, StateDir, DiskActivities],
) -> None:
    """The second rebuild of an instance starts on an overlay; prepare that stopped early changed nothing."""
    vm, state, disks = setup
    first, size = cached_image(state)
    await env.run(disks.prepare_root_disk, prepare_input(first, size))
    await env.run(disks.remove_backup, RemoveBackupInput(instance="vm-1", rebuild_id=REBUILD_ID))
    second, _ = cached_image(state, marker="newer image")
    restore = RestoreRootDiskInput(
        instance="vm-1", rebuild_id="second-rebuild", original_format="qcow2", image_sha256=second
    )
    await env.run(disks.restore_root_disk, restore)
    assert info(vm.disk)["backing-filename"] == str(state.image_path(first))


def stage_input(sha: str, size: int) -> StageRootDiskInput:
    return StageRootDiskInput(
        instance="vm-1",
        rebuild_id=REBUILD_ID,
        image_sha256=sha,
        image_format="qcow2",
        image_virtual_size=size,
    )


async def test_a_disk_staged_while_the_instance_runs_is_what_prepare_swaps_in(
    setup: tuple[DriverInstance, StateDir, DiskActivities],
) -> None:
    """The overlay is made before the stop; prepare, in the downtime window, only links and renames."""
    vm, state, disks = setup
    vm.libvirt.connection().lookupByName("vm-1").create()
    sha, size = cached_image(state)

    staged = await env.run(disks.stage_root_disk, stage_input(sha, size))
    assert vm.disk.read_bytes()[:4] != b"QFI\xfb", "the running instance's disk is untouched"
    again = await env.run(disks.stage_root_disk, stage_input(sha, size))
    assert again == staged
    assert staged.virtual_size == 8 << 20, "as large as the old disk"
    staged_inode = os.stat(staged.staged_at).st_ino

    vm.libvirt.connection().lookupByName("vm-1").destroy()
    await env.run(disks.prepare_root_disk, prepare_input(sha, size))

    assert os.stat(vm.disk).st_ino == staged_inode
    assert info(vm.disk)["backing-filename"] == str(state.image_path(sha))
    assert root_format(vm) == "qcow2"


async def test_a_disk_that_grew_after_staging_gets_a_new_disk_as_large(
    setup: tuple[DriverInstance, StateDir, DiskActivities],
) -> None:
    vm, state, disks = setup
    sha, size = cached_image(state)
    staged = await env.run(disks.stage_root_disk, stage_input(sha, size))
    os.truncate(vm.disk, 16 << 20)  # virsh blockresize while it ran

    prepared = await env.run(disks.prepare_root_disk, prepare_input(sha, size))

    assert prepared.virtual_size == 16 << 20
    assert info(vm.disk)["virtual-size"] == 16 << 20
    assert not Path(staged.staged_at).exists()


async def test_a_staged_disk_is_discarded_and_the_old_one_kept(
    setup: tuple[DriverInstance, StateDir, DiskActivities],
) -> None:
    vm, state, disks = setup
    before = vm.disk.read_bytes()
    sha, size = cached_image(state)
    staged = await env.run(disks.stage_root_disk, stage_input(sha, size))

    discard = DiscardStagedRootDiskInput(instance="vm-1", rebuild_id=REBUILD_ID)
    await env.run(disks.discard_staged_root_disk, discard)
    await env.run(disks.discard_staged_root_disk, discard)

    assert not Path(staged.staged_at).exists()
    assert vm.disk.read_bytes() == before
    assert list(vm.disk.parent.glob("*.rebuild-*")) == []


async def test_swap_in_one_step_swaps_and_starts_and_a_retry_after_its_start_stops_nothing(
    tmp_path: Path,
) -> None:
    vm = make_instance(tmp_path, running=True, disk_size=8 << 20)
    state = StateDir(tmp_path / "state")
    disks = DiskActivities(vm.libvirt, state)
    swap = SwapActivities(HypervisorActivities(vm.libvirt, state=state), disks).swap_root_disk
    old_bytes = vm.disk.read_bytes()
    sha, size = cached_image(state)
    request = SwapRootDiskInput(
        stop=StopInstanceInput(instance="vm-1", timeout_seconds=0),
        prepare=prepare_input(sha, size),
        start=StartInstanceInput(instance="vm-1"),
    )
    first = await env.run(swap, request)
    domain = vm.libvirt.domain("vm-1")
    run_id = domain.run_id()
    assert run_id is not None and first.stopped.forced and not first.started.already_running
    assert root_format(vm) == "qcow2" and info(vm.disk)["format"] == "qcow2"
    assert backup_path(str(vm.disk), REBUILD_ID).read_bytes() == old_bytes
    # The worker died before it reported: the retry finds this rebuild's boot and leaves it running.
    again = await env.run(swap, request)
    assert again.started.already_running and again.stopped.forced
    assert domain.run_id() == run_id
    assert backup_path(str(vm.disk), REBUILD_ID).read_bytes() == old_bytes


async def test_a_cancel_during_the_swap_lets_prepare_finish_and_starts_nothing(tmp_path: Path) -> None:
    """An abort cancels ``swap_root_disk``; the rollback that follows must not race a prepare or a
    start still under way, so prepare ends first and start never begins."""
    vm = make_instance(tmp_path, running=True, disk_size=8 << 20)
    state = StateDir(tmp_path / "state")
    pauses = tmp_path / "pauses"
    pauses.mkdir()
    checkpoints = Checkpoints(pauses)
    disks = DiskActivities(vm.libvirt, state, checkpoints)
    hypervisor = HypervisorActivities(vm.libvirt, checkpoints, state=state)
    swap = SwapActivities(hypervisor, disks).swap_root_disk
    sha, size = cached_image(state)
    request = SwapRootDiskInput(
        stop=StopInstanceInput(instance="vm-1", timeout_seconds=0),
        prepare=prepare_input(sha, size),
        start=StartInstanceInput(instance="vm-1"),
    )
    gate = pauses / "prepare.after-backup"
    gate.touch()
    cancelled = ActivityEnvironment()
    running = asyncio.ensure_future(cancelled.run(swap, request))
    while not (pauses / "prepare.after-backup.reached").exists():
        await asyncio.sleep(0.05)
    cancelled.cancel()
    await asyncio.sleep(0.3)
    assert not running.done(), "the swap gave up in the middle of prepare"
    gate.unlink()
    with pytest.raises(asyncio.CancelledError):
        await running
    assert root_format(vm) == "qcow2", "prepare did not finish its swap"
    assert not vm.libvirt.domain("vm-1").is_active(), "start began after the cancel"
