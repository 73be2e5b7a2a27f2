"""Pre-flight: instance downtime for a rebuild to a broken image, with and without it, same run.

Without pre-flight the rebuild runs in Nova's order for a broken image: stop, new disk, start, the boot
check fails at its timeout, roll back, start the old disk. With pre-flight the image fails in a
sandbox and the instance never stops. A watcher samples the instance's state every 10 ms and adds up
the time it was not running. A third run measures what pre-flight adds to a good rebuild (it runs
while the instance still serves). Real libvirtd, the real workflow on the dev server, two guests:
boot-sector guests under TCG, then the real Debian guest (``devtools.real_guest``), whose downtime in
Nova's order lasts until its old image's guest agent answers again, and whose broken image is a kernel
that panics. Quick mode leaves out the real guest's good-rebuild pair (three more boots of it).

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
from temporalio.testing import ActivityEnvironment

from activities.images import ImageActivities
from activities.state import StateDir
from bench.common import QUICK, GiB, table
from bench.rebuild_service import WORKFLOW_QUEUE, rebuild_service
from devtools.image_server import ImageServer
from devtools.reachable import reachable_dir
from devtools.real_guest import ensure_images, image_sha256
from devtools.real_guest_domain import DOMAIN_TYPE
from devtools.testbed.e2e import LIBVIRT_URI, LOOPBACK_POLICY, Guest, make_guest, serve
from devtools.testbed.real_guest import define, wait_for_agent
from workflows.models import (
    CheckImageInput,
    FetchImageInput,
    RebuildRequest,
    rebuild_workflow_id,
)
from workflows.rebuild import RebuildInstance

BOOT_TIMEOUT = 5.0 if QUICK else 20.0
# The real guest: a broken image fails at this timeout with pre-flight or without; a good one boots in it.
REAL_BROKEN_TIMEOUT = 60.0
REAL_BOOT_TIMEOUT = 600.0
Row = tuple[str, str, str, str]
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


async def rebuild(client: Client, guest: Guest, url: str, sha: str, preflight: bool, **how: Any) -> Any:
    """("rebuilt" or "failed", seconds) of one rebuild; ``how`` says how to stop and verify."""
    request = RebuildRequest(
        instance=guest.name, host=HOST, image_url=url, sha256=sha, preflight=preflight, **how
    )
    began = time.perf_counter()
    try:
        await client.execute_workflow(
            RebuildInstance.run, request, id=rebuild_workflow_id(HOST, guest.name), task_queue=WORKFLOW_QUEUE
        )
        outcome = "rebuilt"
    except WorkflowFailureError:
        outcome = "failed"
    return outcome, time.perf_counter() - began


def boot_sector(marker: str) -> dict[str, Any]:
    return {"stop_timeout_seconds": 0, "boot_marker": marker, "boot_timeout_seconds": BOOT_TIMEOUT}


async def boot_sector_figures(client: Client, conn: Any, images: ImageServer, workdir: Path) -> list[Row]:
    guests = [make_guest(conn, workdir) for _ in range(4)]
    try:
        broken_url, broken_sha = serve(images, "broken C", "raw")
        good_url, good_sha = serve(images, "image B", "raw")
        # Warm the image cache and its check for both images, so the runs compare like with like.
        for url, sha in ((broken_url, broken_sha), (good_url, good_sha)):
            await rebuild(client, guests[3], url, sha, False, **boot_sector("never"))
        with DowntimeWatch(guests[0]) as without:
            outcome_a, seconds_a = await rebuild(
                client, guests[0], broken_url, broken_sha, False, **boot_sector("image B")
            )
        with DowntimeWatch(guests[1]) as with_preflight:
            outcome_b, seconds_b = await rebuild(
                client, guests[1], broken_url, broken_sha, True, **boot_sector("image B")
            )
        assert (outcome_a, outcome_b) == ("failed", "failed")
        _, plain = await rebuild(client, guests[2], good_url, good_sha, False, **boot_sector("image B"))
        _, checked = await rebuild(client, guests[2], good_url, good_sha, True, **boot_sector("image B"))
    finally:
        for guest in guests:
            guest.remove()
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


def real_guest(boot_timeout: float) -> dict[str, Any]:
    return {"stop_timeout_seconds": 120, "verify": "agent", "boot_timeout_seconds": boot_timeout}


async def real_guest_figures(client: Client, conn: Any, workdir: Path) -> list[Row]:
    """The same on the real Debian guest, where downtime lasts until its guest agent answers again."""
    images = ensure_images()
    guest = define(conn, workdir, images.a, DOMAIN_TYPE, agent=True)
    served = ImageServer(workdir / "real-served")
    served.directory.mkdir()
    for variant in ("a", "b", "panic"):
        (served.directory / f"{variant}.qcow2").symlink_to(getattr(images, variant))
    await served.start()
    urls = {v: (served.url(f"{v}.qcow2"), image_sha256(getattr(images, v))) for v in ("a", "b", "panic")}
    rows: list[Row] = []
    try:
        guest.domain.create()
        wait_for_agent(guest)
        # The image cache, warm for every image: downloads would otherwise weigh on one run only.
        state = StateDir(workdir / "state")
        cache = ImageActivities(state, address_policy=LOOPBACK_POLICY)
        for url, sha in urls.values():
            await ActivityEnvironment().run(
                cache.fetch_image, FetchImageInput(url=url, sha256=sha, max_bytes=GiB << 2)
            )
            await ActivityEnvironment().run(
                cache.check_image, CheckImageInput(sha256=sha, max_virtual_size_bytes=GiB << 2)
            )
        with DowntimeWatch(guest) as without:
            outcome_a, seconds_a = await rebuild(
                client, guest, *urls["panic"], False, **real_guest(REAL_BROKEN_TIMEOUT)
            )
            wait_for_agent(guest)  # the old image serves again only once it has booted
            served_again = time.perf_counter()
        assert without.first_down is not None
        nova_down = served_again - without.first_down
        domain_id = guest.domain.ID()
        with DowntimeWatch(guest) as with_preflight:
            outcome_b, seconds_b = await rebuild(
                client, guest, *urls["panic"], True, **real_guest(REAL_BROKEN_TIMEOUT)
            )
        assert (outcome_a, outcome_b) == ("failed", "failed") and guest.domain.ID() == domain_id
        rows += [
            (
                "downtime, rebuild to a kernel that panics, with pre-flight",
                f"{with_preflight.down:.2f} s",
                f"Nova's order (stop, boot fails at {REAL_BROKEN_TIMEOUT:g} s, roll back, old image's agent "
                f"answers): {nova_down:.1f} s",
                f"{with_preflight.down / nova_down:.2f}x (0 s)",
            ),
            ("time to the failure, with pre-flight", f"{seconds_b:.1f} s", f"without: {seconds_a:.1f} s", ""),
        ]
        if not QUICK:
            _, plain = await rebuild(client, guest, *urls["b"], False, **real_guest(REAL_BOOT_TIMEOUT))
            wait_for_agent(guest)
            _, checked = await rebuild(client, guest, *urls["a"], True, **real_guest(REAL_BOOT_TIMEOUT))
            rows.append(
                (
                    "a good rebuild with pre-flight (instance still serving during it)",
                    f"{checked:.1f} s",
                    f"without: {plain:.1f} s",
                    f"+{checked - plain:.1f} s",
                )
            )
    finally:
        guest.remove()
        await served.stop()
    return rows


async def run(workdir: Path) -> tuple[list[Row], list[Row]]:
    conn = libvirt.open(LIBVIRT_URI)
    images = ImageServer(workdir / "served")
    images.directory.mkdir()
    await images.start()
    try:
        async with rebuild_service(workdir, HOST, workdir / "state") as client:
            tiny = await boot_sector_figures(client, conn, images, workdir)
            real = await real_guest_figures(client, conn, workdir)
    finally:
        await images.stop()
        conn.close()
    return tiny, real


def main() -> None:
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    with reachable_dir("bench-preflight-") as tmp:
        tiny, real = asyncio.run(run(Path(tmp)))
    table("Pre-flight on a real libvirtd guest (boot sector, TCG)", tiny)
    table("Pre-flight on the real Debian guest (TCG, verified by its guest agent)", real)


if __name__ == "__main__":
    main()
