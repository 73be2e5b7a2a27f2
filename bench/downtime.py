"""Instance downtime: our order (download and check while the instance runs) against Nova's order
(stop, then download, check, prepare, start), on a real libvirtd guest, same image, same run.

The image is real data (a boot sector, then random bytes), served by an aiohttp server in its own
process; each order starts from an empty cache. Downtime runs from the stop request to the start's
return. A third figure runs the real workflow on the dev server.

    .venv/bin/python -m bench.downtime [--quick]
"""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path
from typing import Any

import libvirt
from temporalio.testing import ActivityEnvironment

from activities.disks import DiskActivities
from activities.hypervisor import HypervisorActivities
from activities.images import ImageActivities
from activities.libvirt_domain import Libvirt
from activities.state import StateDir
from bench.common import QUICK, GiB, MiB, random_file, start_image_server, table, timed
from bench.rebuild_service import WORKFLOW_QUEUE, rebuild_service
from devtools.guest import boot_sector
from devtools.reachable import reachable_dir
from devtools.temporal_dev import free_port
from devtools.testbed.e2e import LIBVIRT_URI, LOOPBACK_POLICY, make_guest
from workflows.models import (
    CheckImageInput,
    FetchImageInput,
    PrepareRootDiskInput,
    RebuildRequest,
    StartInstanceInput,
    StopInstanceInput,
    rebuild_workflow_id,
)
from workflows.rebuild import RebuildInstance

SIZE = 128 * MiB if QUICK else GiB


def bootable_image(path: Path) -> str:
    random_file(path, SIZE)
    with open(path, "r+b") as image:
        image.write(boot_sector("image B"))
    digest = hashlib.sha256()
    with open(path, "rb") as image:
        while block := image.read(16 * MiB):
            digest.update(block)
    return digest.hexdigest()


async def one_order(nova: bool, name: str, url: str, sha: str, state_dir: Path) -> tuple[float, float]:
    """(off → running, stop request → running): the first leaves out QEMU's own teardown."""
    conn = Libvirt(LIBVIRT_URI)
    state = StateDir(state_dir)
    hypervisor, images, disks = (
        HypervisorActivities(conn),
        ImageActivities(state, address_policy=LOOPBACK_POLICY),
        DiskActivities(conn, state),
    )
    env = ActivityEnvironment()

    async def fetch_and_check() -> Any:
        cached = await env.run(images.fetch_image, FetchImageInput(url=url, sha256=sha, max_bytes=2 * SIZE))
        return await env.run(
            images.check_image, CheckImageInput(sha256=cached.sha256, max_virtual_size_bytes=GiB * 4)
        )

    async def prepare_and_start(image: Any) -> None:
        if image is None:  # Nova's order: the download happens while the instance is off
            image = await fetch_and_check()
        await env.run(
            disks.prepare_root_disk,
            PrepareRootDiskInput(
                instance=name, image_sha256=image.sha256, image_format=image.format,
                image_virtual_size=image.virtual_size, original_format="raw", rebuild_id=f"bench-{nova}",
            ),
        )  # fmt: skip
        await env.run(hypervisor.start_instance, StartInstanceInput(instance=name))

    image = None if nova else await fetch_and_check()
    with timed() as down:
        await env.run(hypervisor.stop_instance, StopInstanceInput(instance=name, timeout_seconds=0))
        with timed() as off:
            await prepare_and_start(image)
    conn.close()
    return off[0], down[0]


async def workflow_downtime(name: str, url: str, sha: str, workdir: Path) -> tuple[float, float]:
    host = "bench-downtime"
    async with rebuild_service(workdir, host, workdir / "wf-state") as client:
        result = await client.execute_workflow(
            RebuildInstance.run,
            RebuildRequest(instance=name, host=host, image_url=url, sha256=sha, stop_timeout_seconds=0),
            id=rebuild_workflow_id(host, name),
            task_queue=WORKFLOW_QUEUE,
        )
    assert result.downtime_seconds is not None
    return result.downtime_seconds, result.step_seconds["stop"]


def main() -> None:
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    conn = libvirt.open(LIBVIRT_URI)
    with reachable_dir("bench-downtime-") as tmp:
        workdir = Path(tmp)
        served = workdir / "served"
        served.mkdir()
        sha = bootable_image(served / "image.raw")
        port = free_port()
        server = start_image_server(served, port)
        url = f"http://127.0.0.1:{port}/image.raw"
        guests = [make_guest(conn, workdir) for _ in range(3)]
        try:
            ours, ours_with_stop = asyncio.run(one_order(False, guests[0].name, url, sha, workdir / "ours"))
            nova, nova_with_stop = asyncio.run(one_order(True, guests[1].name, url, sha, workdir / "nova"))
            off_to_on, stop = asyncio.run(workflow_downtime(guests[2].name, url, sha, workdir))
            for guest in guests:
                guest.wait_for_console("image B")
        finally:
            server.terminate()
            for guest in guests:
                guest.remove()
    table(
        f"Instance downtime, {SIZE // MiB} MiB image, real libvirtd guest",
        [
            ("our order, off → running (prepare, start)", f"{ours:.2f} s",
             f"Nova's order (fetch, check, prepare, start): {nova:.2f} s",
             f"{ours / nova:.2f}x Nova (<= 0.2)"),
            ("the same from the stop request (QEMU teardown included)", f"{ours_with_stop:.2f} s",
             f"Nova's order: {nova_with_stop:.2f} s", f"{ours_with_stop / nova_with_stop:.2f}x Nova"),
            ("the workflow on the dev server: off → running (host clock)", f"{off_to_on:.2f} s",
             f"stop step incl. forced off: {stop:.2f} s", "independent of image size"),
        ],
    )  # fmt: skip


if __name__ == "__main__":
    main()
