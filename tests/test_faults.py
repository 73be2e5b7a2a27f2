"""Faults at every phase, on real guests: the rebuild finishes, or it puts the instance back.

Workers are killed at named pause points (``--pause-dir``), not by sleeps and luck. After each test the
invariant holds: the guest booted the new image or the old one, no backup, partial download or overlay
is left behind.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from temporalio.client import Client, WorkflowFailureError, WorkflowHandle
from temporalio.contrib.pydantic import pydantic_data_converter

from activities.state import StateDir
from devtools.image_server import Fault, ImageServer
from devtools.temporal_dev import DevServer, free_port
from devtools.testbed.e2e import (
    Guest,
    WorkerProcess,
    rebuild_cli,
    serve,
    wait_for_file,
)
from workflows.models import RebuildResult, rebuild_workflow_id


def start_args(guest: Guest, worker: WorkerProcess, url: str, sha: str | None, *extra: str) -> list[str]:
    args = ["start", guest.name, "--image", url, "--host", worker.host, "--stop-timeout", "0"]
    args += ["--boot-marker", "image B", "--boot-timeout", "20"]
    if sha:
        args += ["--sha256", sha]
    return [*args, *extra]


def handle_for(client: Client, worker: WorkerProcess, guest: Guest) -> WorkflowHandle[Any, Any]:
    return client.get_workflow_handle(rebuild_workflow_id(worker.host, guest.name), result_type=RebuildResult)


def assert_nothing_left(guest: Guest, worker: WorkerProcess) -> None:
    assert guest.leftovers() == []
    assert list(StateDir(worker.state_dir).partial.glob("*.part")) == []


def assert_runs(guest: Guest, marker: str, since: int) -> None:
    """The guest is running, and its last boot (after ``since``) printed ``marker``."""
    assert guest.domain.isActive()
    guest.wait_for_console(marker, after=since)


def assert_disk_bootable(guest: Guest) -> None:
    """At this instant the root disk path holds a whole disk: old raw, or new overlay."""
    out = subprocess.run(
        ["qemu-img", "info", "-U", "--output=json", str(guest.disk)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stderr


async def rebuild_until_paused(
    guest: Guest, worker: WorkerProcess, images: ImageServer, dev_server: DevServer, point: str
) -> tuple[str, str]:
    assert worker.pause_dir is not None
    (worker.pause_dir / point).touch()
    url, sha = serve(images, "image B", "raw")
    started = await rebuild_cli(dev_server.address, *start_args(guest, worker, url, sha))
    assert started.code == 0, started.stderr
    await wait_for_file(worker.pause_dir / f"{point}.reached")
    return url, sha


KILL_POINTS = [
    "check.before-inspect",
    "stop.after-off",
    "prepare.after-backup",
    "prepare.before-swap",
    "prepare.after-new-disk",
    "start.after-create",
]


@pytest.mark.parametrize("point", KILL_POINTS)
async def test_worker_killed_in_each_phase_then_rebuild_finishes(
    client: Client,
    guest: Guest,
    worker: WorkerProcess,
    images: ImageServer,
    dev_server: DevServer,
    point: str,
) -> None:
    # Measured before the rebuild: at ``start.after-create`` the new disk has already booted (and printed
    # its marker) before the worker is killed, so anything printed after image A's boot counts.
    since = len(guest.console())
    await rebuild_until_paused(guest, worker, images, dev_server, point)
    worker.kill()
    assert_disk_bootable(guest)

    assert worker.pause_dir is not None
    (worker.pause_dir / point).unlink()
    worker.start()
    result = await handle_for(client, worker, guest).result()

    assert result.outcome == "rebuilt"
    assert_runs(guest, "image B", since)
    assert guest.root_format() == "qcow2"
    assert_nothing_left(guest, worker)


async def test_temporal_restart_mid_rebuild_then_rebuild_finishes(
    guest: Guest,
    unique_host: str,
    images: ImageServer,
    tmp_path: Path,
    reachable_tmp: Path,
) -> None:
    server = DevServer(tmp_path / "t.db", free_port(), free_port(), tmp_path / "temporal.log")
    server.start()
    own = WorkerProcess(
        unique_host, reachable_tmp / "state", server.address, tmp_path / "w.log", tmp_path / "pause"
    )
    own.pause_dir.mkdir()  # type: ignore[union-attr]
    own.start()
    try:
        await rebuild_until_paused(guest, own, images, server, "prepare.after-backup")
        server.stop()
        server.start()
        (tmp_path / "pause" / "prepare.after-backup").unlink()
        client = await Client.connect(server.address, data_converter=pydantic_data_converter)
        result = await asyncio.wait_for(handle_for(client, own, guest).result(), 120)
        assert result.outcome == "rebuilt"
        assert_runs(guest, "image B", 0)
        assert_nothing_left(guest, own)
    finally:
        own.stop()
        server.stop()


@pytest.mark.parametrize(
    ("fault", "name"),
    [
        (Fault(drop_at_fraction=0.5), "dropped at 50 %"),
        (Fault(statuses=[500]), "HTTP 500 then OK"),
        (Fault(truncate_at_fraction=0.6), "body cut short under a correct Content-Length"),
        (Fault(seconds_per_chunk=0.016), "slow body, longer than the heartbeat timeout"),
        (Fault(stall_at_fraction=0.5), "stalled body"),
    ],
    ids=["drop", "500", "truncated", "slow", "stall"],
)
async def test_image_server_faults_are_survived(
    client: Client,
    guest: Guest,
    worker: WorkerProcess,
    images: ImageServer,
    dev_server: DevServer,
    fault: Fault,
    name: str,
) -> None:
    size = 48 << 20
    url, sha = serve(images, "image B", "raw", size=size)
    images.faults["image-B.raw"] = fault
    began = time.monotonic()
    result = await rebuild_cli(dev_server.address, *start_args(guest, worker, url, sha, "--wait", "--json"))
    assert result.code == 0, f"{name}: {result.stderr}"
    assert result.json()["outcome"] == "rebuilt"
    assert_runs(guest, "image B", 0)
    assert_nothing_left(guest, worker)
    if fault.drop_at_fraction is not None:
        # Resumed with Range: only what was in flight when the connection dropped came twice.
        again = images.bytes_sent("image-B.raw") - size
        assert again <= 0.05 * size, f"{again} bytes downloaded twice"
    if fault.seconds_per_chunk:
        assert time.monotonic() - began > 10, "the slow body should outlast one heartbeat timeout"
        assert len([r for r in images.requests if r.path == "image-B.raw"]) == 1, "slow is not dead"


async def test_server_that_ignores_range_still_gives_the_right_image(
    guest: Guest,
    worker: WorkerProcess,
    images: ImageServer,
    dev_server: DevServer,
) -> None:
    url, sha = serve(images, "image B", "raw", size=12 << 20)
    images.faults["image-B.raw"] = Fault(drop_at_fraction=0.5, then=Fault(ignore_range=True))
    result = await rebuild_cli(dev_server.address, *start_args(guest, worker, url, sha, "--wait"))
    assert result.code == 0, result.stderr
    second = [r for r in images.requests if r.path == "image-B.raw"][1]
    assert second.range_header is not None
    assert second.status == 200  # the Range was ignored: the whole image came again
    assert_runs(guest, "image B", 0)
    assert_nothing_left(guest, worker)


@pytest.mark.parametrize(
    ("serve_wrong", "error"),
    [("404", "answered 404"), ("sha", "has SHA-256")],
    ids=["not-found", "wrong-sha256"],
)
async def test_bad_image_fails_fast_and_never_stops_the_instance(
    guest: Guest,
    worker: WorkerProcess,
    images: ImageServer,
    dev_server: DevServer,
    serve_wrong: str,
    error: str,
) -> None:
    disk_before = guest.disk.read_bytes()
    boots_before = guest.console().count("image A")
    url, sha = serve(images, "image B", "raw")
    if serve_wrong == "404":
        url = images.url("missing.raw")
    else:
        sha = "0" * 64
    began = time.monotonic()
    result = await rebuild_cli(dev_server.address, *start_args(guest, worker, url, sha, "--wait"))
    assert result.code == 1
    assert error in result.stderr
    assert "nothing was changed" in result.stderr
    assert time.monotonic() - began < 10
    assert guest.domain.isActive()
    assert guest.console().count("image A") == boots_before  # never stopped, never rebooted
    assert guest.disk.read_bytes() == disk_before
    assert_nothing_left(guest, worker)


@pytest.mark.parametrize("point", ["check.before-inspect", "prepare.after-backup", "start.after-create"])
async def test_abort_from_the_cli_in_each_phase(
    client: Client,
    guest: Guest,
    worker: WorkerProcess,
    images: ImageServer,
    dev_server: DevServer,
    point: str,
) -> None:
    disk_before = guest.disk.read_bytes()
    boots_before = guest.console().count("image A")
    await rebuild_until_paused(guest, worker, images, dev_server, point)

    aborted = await rebuild_cli(
        dev_server.address, "abort", guest.name, "--host", worker.host, "--reason", "operator changed mind"
    )
    assert aborted.code == 0, aborted.stderr
    assert worker.pause_dir is not None
    (worker.pause_dir / point).unlink()  # the undo may pass the same point again
    with pytest.raises(WorkflowFailureError) as caught:
        await handle_for(client, worker, guest).result()

    assert "operator changed mind" in str(caught.value.cause)
    assert guest.domain.isActive()
    if point == "check.before-inspect":
        assert "nothing was changed" in str(caught.value.cause)
        assert guest.console().count("image A") == boots_before
    else:
        assert "rolled back" in str(caught.value.cause)
        guest.wait_for_console("image A", after=len("image A\r\n") * boots_before)
    assert guest.disk.read_bytes() == disk_before
    assert guest.root_format() == "raw"
    assert_nothing_left(guest, worker)


async def test_compensation_survives_a_worker_crash(
    client: Client,
    guest: Guest,
    worker: WorkerProcess,
    images: ImageServer,
    dev_server: DevServer,
) -> None:
    disk_before = guest.disk.read_bytes()
    assert worker.pause_dir is not None
    (worker.pause_dir / "restore.before-swap").touch()
    await rebuild_until_paused(guest, worker, images, dev_server, "prepare.after-new-disk")
    aborted = await rebuild_cli(
        dev_server.address, "abort", guest.name, "--host", worker.host, "--reason", "x"
    )
    assert aborted.code == 0, aborted.stderr
    (worker.pause_dir / "prepare.after-new-disk").unlink()
    await wait_for_file(worker.pause_dir / "restore.before-swap.reached")
    worker.kill()
    assert_disk_bootable(guest)
    (worker.pause_dir / "restore.before-swap").unlink()
    worker.start()
    with pytest.raises(WorkflowFailureError) as caught:
        await handle_for(client, worker, guest).result()
    assert "rolled back" in str(caught.value.cause)
    assert_runs(guest, "image A", 0)
    assert guest.disk.read_bytes() == disk_before
    assert_nothing_left(guest, worker)


async def test_libvirt_refusing_to_start_rolls_back(
    client: Client,
    guest: Guest,
    worker: WorkerProcess,
    images: ImageServer,
    dev_server: DevServer,
) -> None:
    disk_before = guest.disk.read_bytes()
    _, sha = await rebuild_until_paused(guest, worker, images, dev_server, "prepare.after-new-disk")
    # The overlay's base image vanishes: QEMU cannot open the new disk, libvirt refuses the start.
    base = StateDir(worker.state_dir).image_path(sha)
    base.rename(base.with_suffix(".away"))
    assert worker.pause_dir is not None
    (worker.pause_dir / "prepare.after-new-disk").unlink()
    with pytest.raises(WorkflowFailureError) as caught:
        await handle_for(client, worker, guest).result()
    message = str(caught.value.cause)
    assert "failed at start" in message
    assert "rolled back" in message
    assert_runs(guest, "image A", len(guest.console()) - len("image A\r\n"))
    assert guest.disk.read_bytes() == disk_before
    assert_nothing_left(guest, worker)


@pytest.fixture
def tiny_state_dir(reachable_tmp: Path) -> Iterator[Path]:
    """A state directory on an 8 MiB tmpfs, so a download runs out of space for real."""
    mount = reachable_tmp / "tiny"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)], check=False)
    if done.returncode != 0:
        pytest.fail("cannot mount a tmpfs for the out-of-space test (needs root)", pytrace=False)
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.parametrize("announce_length", [True, False], ids=["content-length", "no-length"])
async def test_host_out_of_space_fails_before_stop(
    guest: Guest,
    dev_server: DevServer,
    unique_host: str,
    images: ImageServer,
    tmp_path: Path,
    tiny_state_dir: Path,
    announce_length: bool,
) -> None:
    own = WorkerProcess(unique_host, tiny_state_dir, dev_server.address, tmp_path / "w.log")
    own.start()
    try:
        boots_before = guest.console().count("image A")
        url, sha = serve(images, "image B", "raw", size=16 << 20)
        if not announce_length:
            images.faults["image-B.raw"] = Fault(hide_length=True)
        result = await rebuild_cli(dev_server.address, *start_args(guest, own, url, sha, "--wait"))
        assert result.code == 1
        assert "space" in result.stderr
        assert "nothing was changed" in result.stderr
        assert guest.domain.isActive()
        assert guest.console().count("image A") == boots_before
        assert_nothing_left(guest, own)
    finally:
        own.stop()


async def test_status_shows_attempts_and_last_error_while_retrying(
    client: Client,
    guest: Guest,
    worker: WorkerProcess,
    images: ImageServer,
    dev_server: DevServer,
) -> None:
    url, sha = serve(images, "image B", "raw")
    # Five failures keep the fetch retrying for about 15 s: long enough for two status calls to
    # see it even on a loaded machine.
    images.faults["image-B.raw"] = Fault(statuses=[503] * 5)
    started = await rebuild_cli(dev_server.address, *start_args(guest, worker, url, sha))
    assert started.code == 0, started.stderr
    deadline = time.monotonic() + 30
    while True:
        status = await rebuild_cli(dev_server.address, "status", guest.name, "--host", worker.host, "--json")
        pending = status.json()["pending_activities"]
        if pending and pending[0]["attempt"] >= 2 and pending[0]["last_error"]:
            break
        assert time.monotonic() < deadline, status.stdout
        await asyncio.sleep(0.3)
    assert pending[0]["activity"] == "fetch_image"
    assert "503" in pending[0]["last_error"]
    human = await rebuild_cli(dev_server.address, "status", guest.name, "--host", worker.host)
    assert "attempt" in human.stdout
    result = await handle_for(client, worker, guest).result()
    assert result.outcome == "rebuilt"
