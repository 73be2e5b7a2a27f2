"""Pre-flight: instance downtime for a rebuild to a broken image, with and without it, same run.

Without pre-flight the rebuild runs in Nova's order for a broken image: stop, new disk, start, the boot
check fails at its timeout, roll back, start the old disk. With pre-flight the image fails in a
sandbox and the instance never stops. A watcher samples the instance's state every 10 ms and adds up
the time it was not running. A third run measures what pre-flight adds to a good rebuild (it runs
while the instance still serves). Real libvirtd, boot-sector guests under TCG, the real workflow on the
dev server.

    .venv/bin/python -m bench.preflight [--quick]
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

import libvirt
from temporalio.client import Client, WorkflowFailureError
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.worker import Worker

from bench.common import QUICK, table
from devtools.image_server import ImageServer
from devtools.reachable import reachable_dir
from devtools.temporal_dev import DevServer, free_port
from tests.e2e_support import LIBVIRT_URI, LOOPBACK_NETWORKS, Guest, make_guest, serve
from worker import WorkerConfig, host_activities
from workflows.models import RebuildRequest, host_task_queue, rebuild_workflow_id
from workflows.rebuild import RebuildInstance

BOOT_TIMEOUT = 5.0 if QUICK else 20.0
HOST = "bench-preflight"


class DowntimeWatch:
    """When the instance stopped serving its old image and when it served again, sampled every 10 ms.

    Downtime runs from the first moment the domain is off to the last moment it comes back: in Nova's
    order the broken image runs in between, which serves nothing.
    """

    def __init__(self, guest: Guest) -> None:
        self.domain = libvirt.open(LIBVIRT_URI).lookupByName(guest.name)
        self.first_down: float | None = None
        self.last_up: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @property
    def down(self) -> float:
        if self.first_down is None or self.last_up is None:
            return 0.0
        return self.last_up - self.first_down

    def _run(self) -> None:
        was_active = True
        while not self._stop.is_set():
            time.sleep(0.01)
            active = bool(self.domain.isActive())
            now = time.perf_counter()
            if not active and self.first_down is None:
                self.first_down = now
            if active and not was_active:
                self.last_up = now
            was_active = active

    def __enter__(self) -> DowntimeWatch:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


async def rebuild(client: Client, guest: Guest, url: str, sha: str, marker: str, preflight: bool) -> Any:
    request = RebuildRequest(
        instance=guest.name,
        host=HOST,
        image_url=url,
        sha256=sha,
        stop_timeout_seconds=0,
        boot_marker=marker,
        boot_timeout_seconds=BOOT_TIMEOUT,
        preflight=preflight,
    )
    began = time.perf_counter()
    try:
        await client.execute_workflow(
            RebuildInstance.run, request, id=rebuild_workflow_id(HOST, guest.name), task_queue="bench-wf"
        )
        outcome = "rebuilt"
    except WorkflowFailureError:
        outcome = "failed"
    return outcome, time.perf_counter() - began


async def run(workdir: Path) -> list[tuple[str, str, str, str]]:
    conn = libvirt.open(LIBVIRT_URI)
    server = DevServer(workdir / "t.db", free_port(), free_port(), workdir / "t.log")
    server.start()
    images = ImageServer(workdir / "served")
    images.directory.mkdir()
    await images.start()
    guests = [make_guest(conn, workdir) for _ in range(4)]
    try:
        broken_url, broken_sha = serve(images, "broken C", "raw")
        good_url, good_sha = serve(images, "image B", "raw")
        client = await Client.connect(server.address, data_converter=pydantic_data_converter)
        config = WorkerConfig(
            host=HOST,
            libvirt_uri=LIBVIRT_URI,
            state_dir=workdir / "state",
            allowed_image_networks=LOOPBACK_NETWORKS,
        )
        async with (
            Worker(client, task_queue="bench-wf", workflows=[RebuildInstance]),
            Worker(client, task_queue=host_task_queue(HOST), activities=host_activities(config)),
        ):
            # Warm the image cache and its check for both images, so the runs compare like with like.
            for url, sha in ((broken_url, broken_sha), (good_url, good_sha)):
                await rebuild(client, guests[3], url, sha, "never", preflight=False)
            with DowntimeWatch(guests[0]) as without:
                outcome_a, seconds_a = await rebuild(
                    client, guests[0], broken_url, broken_sha, "image B", False
                )
            with DowntimeWatch(guests[1]) as with_preflight:
                outcome_b, seconds_b = await rebuild(
                    client, guests[1], broken_url, broken_sha, "image B", True
                )
            assert (outcome_a, outcome_b) == ("failed", "failed")
            _, plain = await rebuild(client, guests[2], good_url, good_sha, "image B", False)
            _, checked = await rebuild(client, guests[2], good_url, good_sha, "image B", True)
    finally:
        for guest in guests:
            guest.remove()
        await images.stop()
        server.stop()
        conn.close()
    return [
        (
            "downtime, rebuild to a broken image with pre-flight",
            f"{with_preflight.down:.2f} s",
            f"without (stop, boot fails at {BOOT_TIMEOUT:g} s, roll back): {without.down:.2f} s",
            f"{with_preflight.down / without.down:.2f}x (0 s)",
        ),
        ("time to the failure, with pre-flight", f"{seconds_b:.2f} s", f"without: {seconds_a:.2f} s", ""),
        (
            "a good rebuild with pre-flight (instance still serving during it)",
            f"{checked:.2f} s",
            f"without: {plain:.2f} s",
            f"+{checked - plain:.2f} s",
        ),
    ]


def main() -> None:
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    with reachable_dir("bench-preflight-") as tmp:
        rows = asyncio.run(run(Path(tmp)))
    table("Pre-flight on a real libvirtd guest (boot sector, TCG)", rows)


if __name__ == "__main__":
    main()
