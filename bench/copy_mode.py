"""File root disks in copy mode: stage's standalone copy against a plain `cp` of the same image.

Per image size, through the real stage and prepare activities (the instance on libvirt's test driver,
its raw disk a real file on an XFS loop file system with reflinks):

- copy mode where the cache shares the disk's file system (a reflink) against `cp --reflink=never`
  of the same image on the same file system, and coreutils' own default `cp` (which reflinks too);
- copy mode where the cache is on another file system (a full copy by qemu-img convert) against
  `cp --reflink=never` across the same two file systems, and `cp --sparse=always` (the alternative to
  qemu-img for a full copy);
- overlay mode's stage for reference, and prepare (the swap, inside the downtime) in both modes: the
  rest of the downtime (stop, start) does not depend on the mode.

    .venv/bin/python -m bench.copy_mode [--quick]
"""

from __future__ import annotations

import asyncio
import subprocess
import uuid
from pathlib import Path

from temporalio.testing import ActivityEnvironment

from activities.disks import DiskActivities
from activities.state import StateDir
from bench.common import QUICK, GiB, MiB, table, timed
from bench.pools import cached_image
from devtools.reachable import reachable_dir
from devtools.testbed.libvirt_test_driver import make_instance
from devtools.testbed.pools import shared_bytes, xfs_mount
from workflows.models import PrepareRootDiskInput, StageRootDiskInput

SIZES = (64 * MiB, 256 * MiB) if QUICK else (GiB, 4 * GiB)


def cp(source: Path, target: Path, *options: str) -> float:
    """`cp` of the image, flushed to disk (``sync FILE``) as stage flushes its copy."""
    with timed() as copying:
        subprocess.run(["cp", *options, str(source), str(target)], check=True)
        subprocess.run(["sync", str(target)], check=True)
    target.unlink()
    return copying[0]


async def stage_and_swap(
    directory: Path, state: StateDir, sha: str, size: int, mode: str
) -> tuple[float, float, str]:
    """(stage, prepare, how stage made the disk) for a new instance whose disk lies in ``directory``."""
    directory.mkdir()
    vm = make_instance(directory, running=False, disk_size=size)
    disks, env = DiskActivities(vm.libvirt, state), ActivityEnvironment()
    common = {"instance": vm.name, "rebuild_id": f"bench-{uuid.uuid4().hex[:8]}", "image_sha256": sha,
              "image_format": "raw", "image_virtual_size": size}  # fmt: skip
    with timed() as staging:
        staged = await env.run(disks.stage_root_disk, StageRootDiskInput(**common, disk_mode=mode))
    with timed() as swap:
        await env.run(disks.prepare_root_disk, PrepareRootDiskInput(**common, original_format="raw"))
    if staged.mode == "copy (reflink)":
        assert shared_bytes(vm.disk) > 0, "a reflink shares the image's extents"
    subprocess.run(["rm", "-rf", str(directory)], check=True)
    return staging[0], swap[0], staged.mode


def row(what: str, seconds: float, reference: str, reference_seconds: float) -> tuple[str, str, str, str]:
    value = f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"
    return what, value, reference, f"{seconds / reference_seconds:.3f}x"


def main() -> None:
    rows: list[tuple[str, str, str, str]] = []
    with reachable_dir("bench-copy-") as tmp, xfs_mount(tmp, 3 * SIZES[-1] + GiB) as xfs:
        for size in SIZES:
            label = f"{size // MiB} MiB"
            near, far = StateDir(xfs / f"state-{size}"), StateDir(tmp / f"state-{size}")
            sha, far_sha = cached_image(near, size), cached_image(far, size)
            image, far_image = near.image_path(sha), far.image_path(far_sha)
            # A cached image was written long before a rebuild uses it: none of its bytes wait in memory.
            subprocess.run(["sync", str(image), str(far_image)], check=True)

            plain = cp(image, xfs / "plain", "--reflink=never")
            default_cp = cp(image, xfs / "default")
            reflink, reflink_swap, how = asyncio.run(
                stage_and_swap(xfs / f"r-{size}", near, sha, size, "copy")
            )
            assert how == "copy (reflink)", how
            reference = f"cp --reflink=never + sync: {plain:.2f} s"
            rows.append(row(f"{label}: copy mode, {how}", reflink, reference, plain))
            rows.append(row(f"{label}: coreutils' default cp (reflinks too)", default_cp, reference, plain))

            across = cp(far_image, xfs / "across", "--reflink=never")
            sparse = cp(far_image, xfs / "sparse", "--sparse=always")
            full, full_swap, how = asyncio.run(stage_and_swap(xfs / f"f-{size}", far, far_sha, size, "copy"))
            assert how == "copy (full)", how
            reference = f"cp --reflink=never + sync, across: {across:.2f} s"
            rows.append(row(f"{label}: copy mode, {how} (cache on ext4)", full, reference, across))
            rows.append(row(f"{label}: cp --sparse=always across", sparse, reference, across))

            overlay, overlay_swap, _ = asyncio.run(
                stage_and_swap(xfs / f"o-{size}", near, sha, size, "overlay")
            )
            rows.append(row(f"{label}: overlay mode's stage", overlay, reference, across))
            reference = f"overlay mode: {overlay_swap * 1000:.1f} ms"
            for what, swap in (("reflink", reflink_swap), ("full copy", full_swap)):
                rows.append(row(f"{label}: prepare (the swap), {what}", swap, reference, overlay_swap))
            for state in (near, far):
                subprocess.run(["rm", "-rf", str(state.root)], check=True)
    table("File root disks in copy mode (XFS with reflinks on a loop device; ext4 for the far cache)", rows)


if __name__ == "__main__":
    main()
