"""Instance downtime: our order (download and check while the instance runs) against Nova's order
(stop, then download, check, prepare, start), on a real libvirtd guest, same image, same run.

The image is real data (a boot sector, then random bytes), served by an aiohttp server in its own
process; each order starts from an empty cache. Downtime runs from the stop request to the start's
return. A third figure runs the real workflow on the dev server.

The last figure is the one the issue's goal is about: the time the domain is down (libvirt's lifecycle
events, STOPPED to STARTED, read on a connection of their own) when the real workflow rebuilds a guest,
against a bare `virsh destroy` + `virsh start` of the same guest in the same run; the median of
several runs of each, alternated.

    .venv/bin/python -m bench.downtime [--quick]
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
import threading
import time
import unittest.mock
from pathlib import Path
from statistics import median
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


RUNS = int(os.environ.get("BENCH_RUNS", "5"))


class DownWindow:
    """When a domain went off and came back on, by libvirt's lifecycle events (seen from outside)."""

    def __init__(self, conn: Any, name: str) -> None:
        self.stopped: float | None = None
        self.started: float | None = None
        self.came_up = threading.Event()
        self._callback = conn.domainEventRegisterAny(
            conn.lookupByName(name), libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._event, None
        )
        self._conn = conn

    def _event(self, _conn: Any, _dom: Any, event: int, _detail: int, _opaque: Any) -> None:
        now = time.perf_counter()
        if event == libvirt.VIR_DOMAIN_EVENT_STOPPED and self.stopped is None:
            self.stopped = now
        elif event == libvirt.VIR_DOMAIN_EVENT_STARTED and self.stopped is not None:
            self.started = now
            self.came_up.set()

    def seconds(self) -> float:
        assert self.came_up.wait(30), "the domain did not come back"
        self._conn.domainEventDeregisterAny(self._callback)
        assert self.started is not None and self.stopped is not None
        return self.started - self.stopped


def event_connection() -> Any:
    libvirt.virEventRegisterDefaultImpl()

    def loop() -> None:
        while True:
            libvirt.virEventRunDefaultImpl()

    threading.Thread(target=loop, daemon=True).start()
    return libvirt.open(LIBVIRT_URI)


def three_steps(*args: Any, **kwargs: Any) -> HypervisorActivities:
    """The host's activities as a worker from before swap_root_disk offers them: stop, prepare and
    start as three activities, two workflow round trips inside the window (the reference)."""
    kwargs["swaps_in_one_step"] = False
    return HypervisorActivities(*args, **kwargs)


class Downtimes:
    def __init__(self) -> None:
        self.one_step: list[float] = []
        self.three_steps: list[float] = []
        self.floor: list[float] = []
        self.prepare: list[float] = []
        self.verify: list[float] = []


def against_the_floor(guest: Any, url: str, sha: str, workdir: Path) -> Downtimes:
    """RUNS of each, alternated on one guest: a rebuild by today's workflow (stop, prepare and start
    in one activity), one with the three steps, a bare destroy + start."""
    events = event_connection()
    found = Downtimes()

    async def rebuild(client: Any, host: str, run: int, into: list[float]) -> None:
        window = DownWindow(events, guest.name)
        result = await client.execute_workflow(
            RebuildInstance.run,
            RebuildRequest(
                instance=guest.name, host=host, image_url=url, sha256=sha,
                stop_timeout_seconds=0, boot_marker="image B",
            ),
            id=f"{rebuild_workflow_id(host, guest.name)}-{run}",
            task_queue=WORKFLOW_QUEUE,
        )  # fmt: skip
        into.append(window.seconds())
        if into is found.one_step:
            found.prepare.append(result.step_seconds["prepare"])
            found.verify.append(result.step_seconds["verify"])

    def floor() -> None:
        window = DownWindow(events, guest.name)
        subprocess.run(["virsh", "-q", "-c", LIBVIRT_URI, "destroy", guest.name], check=True,
                       stdout=subprocess.DEVNULL)  # fmt: skip
        subprocess.run(["virsh", "-q", "-c", LIBVIRT_URI, "start", guest.name], check=True,
                       stdout=subprocess.DEVNULL)  # fmt: skip
        found.floor.append(window.seconds())

    async def rebuilds() -> None:
        one, three = workdir / "one-step", workdir / "three-steps"
        one.mkdir()
        three.mkdir()
        async with rebuild_service(one, "bench-one", one / "state") as client:
            with unittest.mock.patch("worker.HypervisorActivities", three_steps):
                service = rebuild_service(three, "bench-three", three / "state")
                old = await service.__aenter__()
            try:
                for run in range(RUNS):
                    await rebuild(client, "bench-one", run, found.one_step)
                    floor()
                    await rebuild(old, "bench-three", run, found.three_steps)
            finally:
                await service.__aexit__(None, None, None)

    asyncio.run(rebuilds())
    return found


def ms(values: list[float]) -> str:
    return " ".join(f"{v * 1000:.0f}" for v in values) + " ms"


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
        guests = [make_guest(conn, workdir) for _ in range(4)]
        try:
            ours, ours_with_stop = asyncio.run(one_order(False, guests[0].name, url, sha, workdir / "ours"))
            nova, nova_with_stop = asyncio.run(one_order(True, guests[1].name, url, sha, workdir / "nova"))
            off_to_on, stop = asyncio.run(workflow_downtime(guests[2].name, url, sha, workdir))
            found = against_the_floor(guests[3], url, sha, workdir)
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
            (f"the workflow: domain down, STOPPED → STARTED event (median of {RUNS})",
             f"{median(found.one_step) * 1000:.0f} ms",
             f"bare `virsh destroy` + `virsh start`: {median(found.floor) * 1000:.0f} ms",
             f"{median(found.one_step) / median(found.floor):.2f}x the floor (<= 1.05)"),
            ("the same with stop, prepare, start as three activities (before)",
             f"{median(found.three_steps) * 1000:.0f} ms", "the same floor",
             f"{median(found.three_steps) / median(found.floor):.2f}x the floor"),
            ("every run: one step / three steps / floor", ms(found.one_step), ms(found.three_steps),
             ms(found.floor)),
            ("the workflow's prepare (the swap and its define) inside that window, median",
             f"{median(found.prepare) * 1000:.0f} ms", "", ""),
            ("its verify (boot marker on the file console, from the start's return), median",
             f"{median(found.verify) * 1000:.0f} ms", ms(found.verify), ""),
        ],
    )  # fmt: skip
    print(f"\nload average while measured: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
