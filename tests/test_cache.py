"""The image cache: who uses what, and eviction that never removes an image an instance needs."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from activities.cache import list_cache, prune_cache
from activities.state import StateDir, backup_path
from devtools.guest import write_image
from tests.libvirt_test_driver import make_instances

DAY = 86400.0
BIN = Path(sys.executable).parent


def cache(state: StateDir, marker: str, age_days: float, size: int = 1 << 20) -> str:
    state.create()
    staging = write_image(state.root / f"{marker}.tmp", marker, fmt="raw", size=size)
    sha = hashlib.sha256(staging.read_bytes()).hexdigest()
    target = state.image_path(sha)
    staging.rename(target)
    when = time.time() - age_days * DAY
    os.utime(target, (when, when))
    return sha


def overlay(disk: Path, base: Path) -> None:
    disk.unlink()
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "raw", str(disk)], check=True
    )


def test_images_in_use_are_listed_with_their_instances_and_never_pruned(tmp_path: Path) -> None:
    vm1, vm2, vm3 = make_instances(tmp_path, ["web-1", "web-2", "db-1"])
    state = StateDir(tmp_path / "state")
    in_use = cache(state, "in use", age_days=30)
    in_backup = cache(state, "backup only", age_days=30)
    old_unused = cache(state, "old unused", age_days=30)
    recent_unused = cache(state, "recent unused", age_days=0)
    overlay(vm1.disk, state.image_path(in_use))
    overlay(vm2.disk, state.image_path(in_use))
    # A rebuild waiting for its confirm window keeps the old disk, itself backed by the older image.
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(state.image_path(in_backup)), "-F", "raw",
         str(backup_path(str(vm3.disk), "run-1"))],
        check=True,
    )  # fmt: skip
    conn = vm1.libvirt

    entries = {e.sha256: e for e in list_cache(state, conn)}
    assert entries[in_use].users == ("web-1", "web-2")
    assert entries[in_backup].users == ("db-1",)
    assert entries[old_unused].users == ()

    report = prune_cache(state, conn, max_age_seconds=7 * DAY)
    assert report.removed == [old_unused]
    assert sorted(report.kept_in_use) == sorted([in_use, in_backup])
    assert state.image_path(in_use).exists()
    assert state.image_path(in_backup).exists()
    assert state.image_path(recent_unused).exists()
    assert not state.image_path(old_unused).exists()

    # A size limit of zero takes every unused image, and still none in use.
    report = prune_cache(state, conn, max_age_seconds=7 * DAY, max_total_bytes=0)
    assert report.removed == [recent_unused]
    assert state.image_path(in_use).exists()
    assert state.image_path(in_backup).exists()


def test_dry_run_removes_nothing_and_stale_partials_go(tmp_path: Path) -> None:
    (vm,) = make_instances(tmp_path, ["web-1"])
    state = StateDir(tmp_path / "state")
    old = cache(state, "old", age_days=30)
    partial = state.partial / "abc.part"
    partial.write_bytes(b"half")
    os.utime(partial, (time.time() - 30 * DAY, time.time() - 30 * DAY))
    conn = vm.libvirt
    report = prune_cache(state, conn, max_age_seconds=DAY, dry_run=True)
    assert report.removed == [old]
    assert state.image_path(old).exists()
    assert partial.exists()
    prune_cache(state, conn, max_age_seconds=DAY)
    assert not state.image_path(old).exists()
    assert not partial.exists()


def test_cache_cli_lists_and_prunes(tmp_path: Path) -> None:
    (vm,) = make_instances(tmp_path, ["web-1"])
    state = StateDir(tmp_path / "state")
    used = cache(state, "used", age_days=30)
    unused = cache(state, "unused", age_days=30)
    overlay(vm.disk, state.image_path(used))
    common = ["--state-dir", str(state.root), "--libvirt-uri", vm.libvirt.uri]

    listed = subprocess.run(
        [BIN / "rebuild", "cache", "list", *common, "--json"], capture_output=True, text=True
    )
    assert listed.returncode == 0, listed.stderr
    users = {e["sha256"]: e["users"] for e in json.loads(listed.stdout)}
    assert users == {used: ["web-1"], unused: []}

    human = subprocess.run([BIN / "rebuild", "cache", "list", *common], capture_output=True, text=True)
    assert used[:16] in human.stdout
    assert "web-1" in human.stdout

    pruned = subprocess.run(
        [BIN / "rebuild", "cache", "prune", "--max-age-days", "1", *common], capture_output=True, text=True
    )
    assert pruned.returncode == 0, pruned.stderr
    assert "removed 1 image(s)" in pruned.stdout
    assert "kept 1 in use" in pruned.stdout
    assert state.image_path(used).exists()
    assert not state.image_path(unused).exists()


def test_cache_cli_without_libvirt_says_so(tmp_path: Path) -> None:
    done = subprocess.run(
        [
            BIN / "rebuild",
            "cache",
            "list",
            "--state-dir",
            str(tmp_path),
            "--libvirt-uri",
            "test:///nonexistent.xml",
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 3
    assert "cannot connect to libvirt" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_backup_beside_a_symlinked_root_disk_keeps_its_image(tmp_path: Path) -> None:
    """Backups lie beside the file a link names (the rebuild works there): prune looks there too."""
    (vm,) = make_instances(tmp_path, ["web-1"])
    state = StateDir(tmp_path / "state")
    in_backup = cache(state, "backup only", age_days=30)
    elsewhere = tmp_path / "other-fs"
    elsewhere.mkdir()
    real = elsewhere / vm.disk.name
    vm.disk.rename(real)
    vm.disk.symlink_to(real)
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(state.image_path(in_backup)), "-F", "raw",
         str(backup_path(str(real), "run-1"))],
        check=True,
    )  # fmt: skip

    report = prune_cache(state, vm.libvirt, max_age_seconds=7 * DAY)

    assert report.kept_in_use == [in_backup]
    assert state.image_path(in_backup).exists()
