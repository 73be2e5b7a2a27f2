"""The whole rebuild on real guests: real libvirtd and QEMU, the dev server, a worker process, the CLI.

Each guest's boot sector prints its image's name on the serial console, so the console log proves which
image the guest really booted.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import libvirt
import pytest
from temporalio.client import Client

from devtools.image_server import ImageServer
from devtools.temporal_dev import DevServer
from devtools.testbed.e2e import (
    Guest,
    WorkerProcess,
    make_guest,
    rebuild_cli,
    serve,
    wait_for_file,
)
from workflows.models import rebuild_workflow_id


@pytest.mark.parametrize(("root_format", "image_format"), [("raw", "qcow2"), ("qcow2", "raw")])
async def test_rebuild_boots_the_new_image_and_keeps_the_instance(
    libvirt_conn: Any,
    guests: list[Guest],
    guest_dir: Path,
    worker: WorkerProcess,
    images: ImageServer,
    dev_server: DevServer,
    root_format: str,
    image_format: str,
) -> None:
    guest = make_guest(libvirt_conn, guest_dir, "image A", root_format=root_format)
    guests.append(guest)
    before = guest.identity()
    data_before = guest.data_disk.read_bytes()
    url, sha = serve(images, "image B", image_format)

    result = await rebuild_cli(
        dev_server.address,
        "start", guest.name, "--image", url, "--sha256", sha, "--host", worker.host,
        "--stop-timeout", "1", "--boot-marker", "image B", "--wait", "--json",
    )  # fmt: skip

    assert result.code == 0, result.stderr
    outcome = result.json()
    assert outcome["outcome"] == "rebuilt"
    assert outcome["image_sha256"] == sha
    assert outcome["forced_stop"] is True  # boot-sector guests ignore ACPI
    assert 0 < outcome["downtime_seconds"] < 10
    console = guest.console()
    assert console.index("image A") < console.index("image B")
    assert guest.domain.isActive()
    assert guest.identity() == before
    assert guest.data_disk.read_bytes() == data_before
    assert guest.root_format() == "qcow2"
    assert guest.leftovers() == []
    metadata = guest.domain.metadata(
        libvirt.VIR_DOMAIN_METADATA_ELEMENT, "https://github.com/durable-rebuild/rebuild/1", 0
    )
    assert sha in metadata


async def test_image_that_does_not_boot_is_rolled_back(
    libvirt_conn: Any,
    guests: list[Guest],
    guest_dir: Path,
    worker: WorkerProcess,
    images: ImageServer,
    dev_server: DevServer,
) -> None:
    guest = make_guest(libvirt_conn, guest_dir, "image A")
    guests.append(guest)
    old_disk = guest.disk.read_bytes()
    url, sha = serve(images, "image C", "qcow2")
    booted_a = guest.console().count("image A")

    result = await rebuild_cli(
        dev_server.address,
        "start", guest.name, "--image", url, "--sha256", sha, "--host", worker.host,
        "--stop-timeout", "0", "--boot-marker", "image B", "--boot-timeout", "10", "--wait",
    )  # fmt: skip

    assert result.code == 1
    assert "rolled back" in result.stderr
    assert "did not print 'image B'" in result.stderr
    # Image C booted before the rollback (10 s is for a loaded machine: with 3 s, image C had not
    # printed yet once, and the test could not tell the attempt booted at all).
    # The old image boots once more after the failed attempt booted image C.
    guest.wait_for_console("image A", after=guest.console().index("image C"))
    console = guest.console()
    assert "image C" in console
    assert console.rindex("image A") > console.index("image C")
    assert console.count("image A") == booted_a + 1
    assert guest.domain.isActive()
    assert guest.disk.read_bytes() == old_disk
    assert guest.root_format() == "raw"
    assert guest.leftovers() == []


async def test_worker_killed_during_download_resumes_and_finishes(
    libvirt_conn: Any,
    client: Client,
    guests: list[Guest],
    guest_dir: Path,
    worker: WorkerProcess,
    images: ImageServer,
    dev_server: DevServer,
) -> None:
    guest = make_guest(libvirt_conn, guest_dir, "image A")
    guests.append(guest)
    url, sha = serve(images, "image B", "raw", size=32 << 20)
    assert worker.pause_dir is not None
    gate = worker.pause_dir / "fetch.halfway"
    gate.touch()

    started = await rebuild_cli(
        dev_server.address,
        "start", guest.name, "--image", url, "--sha256", sha, "--host", worker.host,
        "--stop-timeout", "0", "--boot-marker", "image B",
    )  # fmt: skip
    assert started.code == 0, started.stderr
    await wait_for_file(worker.pause_dir / "fetch.halfway.reached")
    worker.kill()
    assert "image B" not in guest.console()
    assert guest.domain.isActive()  # the download happens while the instance still runs

    gate.unlink()
    worker.start()
    handle = client.get_workflow_handle(rebuild_workflow_id(worker.host, guest.name))
    result = await handle.result()

    assert result["outcome"] == "rebuilt"
    guest.wait_for_console("image B")
    ranged = [r for r in images.requests if r.range_header]
    assert ranged, "the second attempt should resume with a Range request"
    assert ranged[0].status == 206
    # It resumed from what the killed worker had written, at least half the image.
    assert ranged[0].range_header is not None
    resumed_from = int(ranged[0].range_header.removeprefix("bytes=").rstrip("-"))
    assert resumed_from >= 16 << 20
    assert guest.leftovers() == []


async def test_unknown_instance_is_bad_input(
    worker: WorkerProcess, images: ImageServer, dev_server: DevServer
) -> None:
    url, _ = serve(images, "image B", "raw")
    result = await rebuild_cli(
        dev_server.address, "start", "no-such-vm", "--image", url, "--host", worker.host, "--wait"
    )
    assert result.code == 2
    assert "no-such-vm" in result.stderr
    assert "Traceback" not in result.stderr


async def test_wait_shows_the_stop_s_graceful_window_while_a_guest_ignores_it(
    guest: Guest, worker: WorkerProcess, images: ImageServer, dev_server: DevServer
) -> None:
    url, sha = serve(images, "image B", "qcow2")
    result = await rebuild_cli(
        dev_server.address,
        "start", guest.name, "--image", url, "--sha256", sha, "--host", worker.host,
        "--stop-timeout", "8", "--boot-marker", "image B", "--wait",
        env={"COLUMNS": "80"},
    )  # fmt: skip
    assert result.code == 0, result.stderr
    lines = result.stderr.splitlines()
    stop_at = next(i for i, line in enumerate(lines) if line.startswith("  phase: stop"))
    # The next phase: verify where stop, prepare and start are one step, prepare where they are three.
    after = next(i for i, line in enumerate(lines) if i > stop_at and line.startswith("  phase: "))
    windows = [line for line in lines[stop_at:after] if line.startswith("  stop: ")]
    left = [int(m.group(1)) for line in windows if (m := re.search(r"shut down, (\d+) s left before", line))]
    # A line every 2 s or so while the window lasts: at least two, counting down.
    assert len(left) >= 2 and left == sorted(left, reverse=True) and left[0] <= 8, result.stderr
    assert all(len(line) <= 80 for line in lines)
    assert "(forced off after the graceful timeout)" in result.stdout  # boot-sector guests ignore ACPI
