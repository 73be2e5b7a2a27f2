"""A rolling rebuild of three real guests: real libvirtd and QEMU, a worker process, the CLI.

The worker lists the guests itself (selection by pattern on what the host reports); each guest's boot
sector prints its image's name, so the console proves which image every guest really booted.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from temporalio.client import Client

from devtools.image_server import ImageServer
from devtools.temporal_dev import DevServer
from devtools.testbed.e2e import DOMAIN_PREFIX, Guest, WorkerProcess, make_guest, rebuild_cli, serve
from devtools.testbed.fleet import down_interval, max_overlap
from workflows.models import rebuild_workflow_id


async def test_rolling_rebuild_of_three_real_guests_one_at_a_time(
    libvirt_conn: Any,
    guests: list[Guest],
    guest_dir: Path,
    worker: WorkerProcess,
    images: ImageServer,
    dev_server: DevServer,
    client: Client,
) -> None:
    for _ in range(3):
        guests.append(make_guest(libvirt_conn, guest_dir, "image A"))
    identities = {g.name: g.identity() for g in guests}
    url, sha = serve(images, "image B", "qcow2")
    args = [
        "fleet", "start", "--image", url, "--sha256", sha, "--select", f"{DOMAIN_PREFIX}*",
        "--host", worker.host, "--batch", "3", "--max-unavailable", "1", "--max-failures", "1",
        "--stop-timeout", "1", "--boot-marker", "image B", "--prefetch", "--name", f"e2e-{worker.host}",
    ]  # fmt: skip

    result = await rebuild_cli(dev_server.address, *args, "--wait", "--json", timeout=300)

    assert result.code == 0, result.stderr
    report = result.json()["report"]
    assert report["counts"]["rebuilt"] == 3 and report["counts"]["total"] == 3
    for guest in guests:
        console = guest.console()
        assert console.index("image A") < console.index("image B"), guest.name
        assert guest.domain.isActive()
        assert guest.identity() == identities[guest.name]
        assert guest.leftovers() == []
    windows = [await down_interval(client, rebuild_workflow_id(worker.host, g.name)) for g in guests]
    assert all(windows) and max_overlap([w for w in windows if w]) == 1

    # The same fleet again: every guest already runs the image, so nothing is stopped.
    again = await rebuild_cli(dev_server.address, *args, "--wait", "--json", timeout=120)
    assert again.code == 0, again.stderr
    assert again.json()["report"]["counts"]["skipped"] == 3
    assert all(g.console().count("image B") == 1 for g in guests)
