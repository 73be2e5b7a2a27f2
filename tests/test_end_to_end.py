"""The whole rebuild on real guests: real libvirtd and QEMU, the dev server, a worker process, the CLI.

Each guest's boot sector prints its image's name on the serial console, so the console log proves which
image the guest really booted.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import libvirt
import pytest
from temporalio.client import Client

from devtools.guest import write_image
from devtools.image_server import ImageServer
from devtools.temporal_dev import DevServer
from tests.e2e_support import (
    LIBVIRT_URI,
    Guest,
    WorkerProcess,
    make_guest,
    rebuild_cli,
    wait_for_file,
)
from workflows.models import rebuild_workflow_id


@pytest.fixture(scope="session")
def libvirt_conn() -> Iterator[Any]:
    if shutil.which("qemu-system-x86_64") is None:
        pytest.fail(
            "QEMU is missing: qemu-system-x86_64 is not on PATH (run scripts/setup-host.sh)", pytrace=False
        )
    try:
        conn = libvirt.open(LIBVIRT_URI)
    except libvirt.libvirtError as err:
        pytest.fail(
            f"libvirtd is not reachable at {LIBVIRT_URI}: {err.get_error_message()} "
            "(run scripts/setup-host.sh)",
            pytrace=False,
        )
    yield conn
    conn.close()


@pytest.fixture
def guest_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "guests"
    directory.mkdir()
    return directory


@pytest.fixture
def guests(libvirt_conn: Any) -> Iterator[list[Guest]]:
    made: list[Guest] = []
    yield made
    for guest in made:
        guest.remove()


@pytest.fixture
def worker(dev_server: DevServer, unique_host: str, tmp_path: Path) -> Iterator[WorkerProcess]:
    pause_dir = tmp_path / "pause"
    pause_dir.mkdir()
    process = WorkerProcess(
        host=unique_host,
        state_dir=tmp_path / "host-state",
        address=dev_server.address,
        log=tmp_path / "worker.log",
        pause_dir=pause_dir,
    )
    process.start()
    yield process
    process.stop()


@pytest.fixture
async def images(tmp_path: Path) -> AsyncIterator[ImageServer]:
    directory = tmp_path / "served"
    directory.mkdir()
    server = ImageServer(directory)
    await server.start()
    yield server
    await server.stop()


def serve(server: ImageServer, marker: str, fmt: str, size: int = 4 << 20) -> tuple[str, str]:
    path = write_image(server.directory / f"{marker.replace(' ', '-')}.{fmt}", marker, fmt=fmt, size=size)
    return server.url(path.name), hashlib.sha256(path.read_bytes()).hexdigest()


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
        "--stop-timeout", "0", "--boot-marker", "image B", "--boot-timeout", "3", "--wait",
    )  # fmt: skip

    assert result.code == 1
    assert "rolled back" in result.stderr
    assert "did not print 'image B'" in result.stderr
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
