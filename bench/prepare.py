"""Preparing the root disk takes constant time, whatever the image size.

Measures the real ``prepare_root_disk`` activity (hard-link backup, qcow2 overlay, atomic swap,
domain redefinition on libvirt's test driver) for a small and a large image, against copying each image
(what a copy-based rebuild would do) in the same run.

    .venv/bin/python -m bench.prepare [--quick]
"""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import statistics
import subprocess
import tempfile
from pathlib import Path

from temporalio.testing import ActivityEnvironment

from activities.disks import DiskActivities
from activities.state import StateDir
from bench.common import QUICK, GiB, MiB, random_file, table, timed
from devtools.testbed.libvirt_test_driver import make_instances
from workflows.models import PrepareRootDiskInput, RestoreRootDiskInput

SMALL, LARGE = 64 * MiB, (1 if QUICK else 4) * GiB
RUNS = 3 if QUICK else 10


def cache_image(state: StateDir, size: int, workdir: Path) -> str:
    """A raw image of ``size`` bytes, all of them real data."""
    path = random_file(workdir / f"image-{size}", size)
    digest = hashlib.sha256()
    with open(path, "rb") as image:
        while block := image.read(16 * MiB):
            digest.update(block)
    sha = digest.hexdigest()
    state.create()
    path.rename(state.image_path(sha))
    return sha


async def prepare_times(workdir: Path, size: int) -> tuple[float, float]:
    (vm,) = make_instances(workdir, [f"vm-{size}"], running=False)
    state = StateDir(workdir / "state")
    sha = cache_image(state, size, workdir)
    disks = DiskActivities(vm.libvirt, state)
    env = ActivityEnvironment()
    times = []
    for run in range(RUNS):
        request = PrepareRootDiskInput(
            instance=vm.name, image_sha256=sha, image_format="raw", image_virtual_size=size,
            original_format="raw", rebuild_id=f"run-{run}",
        )  # fmt: skip
        with timed() as took:
            await env.run(disks.prepare_root_disk, request)
        times.append(took[0])
        restore = RestoreRootDiskInput(instance=vm.name, rebuild_id=f"run-{run}", original_format="raw")
        await env.run(disks.restore_root_disk, restore)
    subprocess.run(["sync"], check=True)
    with timed() as copy:
        shutil.copyfile(state.image_path(sha), workdir / "copy")
        subprocess.run(["sync", str(workdir / "copy")], check=True)
    return statistics.median(times), copy[0]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms"


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="bench-prepare-", dir="/var/tmp") as tmp:
        for name in ("s", "l"):
            (Path(tmp) / name).mkdir()
        small, small_copy = asyncio.run(prepare_times(Path(tmp) / "s", SMALL))
        large, large_copy = asyncio.run(prepare_times(Path(tmp) / "l", LARGE))
    table(
        "Prepare root disk (median of runs), against copying the image",
        [
            (f"prepare, {SMALL // MiB} MiB image", ms(small), f"copy: {ms(small_copy)}",
             f"{small / small_copy:.2f}x copy (<= 50 ms)"),
            (f"prepare, {LARGE // GiB} GiB image", ms(large), f"copy: {ms(large_copy)}",
             f"{large / large_copy:.3f}x copy (<= 50 ms)"),
            ("large / small", f"{large / small:.2f}", "—", "O(1): about 1.0"),
        ],
    )  # fmt: skip


if __name__ == "__main__":
    main()
