"""Issue 25, the operator's first hour: the ``rebuild`` CLI as a subprocess, against the dev server and a
worker whose host activities are the real ones on libvirt's ``test:///`` driver."""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import pty
import re
import signal
import struct
import subprocess
import termios
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import typer
from aiohttp.test_utils import TestClient
from temporalio.client import Client, WorkflowExecutionStatus, WorkflowHandle
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.worker import Replayer

import worker
from activities.state import DEFAULT_STATE_DIR
from common.exit_codes import ExitCode
from devtools import demo
from devtools.image_server import Fault, ImageServer
from devtools.temporal_dev import DevServer
from devtools.testbed.e2e import BIN, serve
from starter.cli import app
from tests.api_support import AUTH
from tests.driver_hosts import NARROW, DriverHost, make_root_disk_a_bare_block_device
from tests.driver_hosts import driver_host as serve_driver_host
from tests.history_recorder import record_patched_history
from workflows.models import RebuildRequest, rebuild_workflow_id
from workflows.names import PATCH_CURRENT_IMAGE
from workflows.rebuild import RebuildInstance


@pytest.fixture
async def driver_host(dev_server: DevServer, unique_host: str, tmp_path: Path) -> AsyncIterator[DriverHost]:
    """vm-1 (a raw file root disk) and vm-2 (a block device no pool manages: not supported)."""
    names = ["vm-1", "vm-2"]
    async with serve_driver_host(dev_server.address, unique_host, tmp_path, names) as host:
        make_root_disk_a_bare_block_device(host, 1)
        yield host


async def test_start_of_an_unknown_instance_exits_2_at_once(driver_host: DriverHost) -> None:
    url = "http://127.0.0.1:9/never-fetched.qcow2"
    code, out, err = await driver_host.cli("start", "no-such-vm", "--host", driver_host.name, "--image", url)
    assert code == ExitCode.BAD_INPUT, (out, err)
    assert "instance 'no-such-vm' is not defined on this host" in err
    assert "started" not in out
    code, out, _ = await driver_host.cli(
        "start", "no-such-vm", "--host", driver_host.name, "--image", url, "--json"
    )
    assert code == ExitCode.BAD_INPUT
    assert '"error_type":"InstanceNotFound"' in out


async def test_start_of_an_unsupported_root_disk_exits_2_at_once(driver_host: DriverHost) -> None:
    url = "http://127.0.0.1:9/never-fetched.qcow2"
    code, out, err = await driver_host.cli("start", "vm-2", "--host", driver_host.name, "--image", url)
    assert code == ExitCode.BAD_INPUT, (out, err)
    assert "/dev/sdz, which belongs to no libvirt storage pool" in err


async def test_start_returns_once_past_inspect_and_says_how_to_follow(
    driver_host: DriverHost, images: ImageServer
) -> None:
    url, sha = serve(images, "image B", "qcow2")
    host = driver_host.name
    code, out, err = await driver_host.cli(
        "start", "vm-1", "--host", host, "--image", url, "--sha256", sha, "--require-approval"
    )
    assert code == ExitCode.OK, err
    assert out.startswith(f"started rebuild of vm-1 on {host}")
    assert "phase inspect" not in out and "phase pending" not in out
    assert f"see: rebuild watch vm-1 --host {host}" in out
    code, _, err = await driver_host.cli("abort", "vm-1", "--host", host, "--reason", "test over")
    assert code == ExitCode.OK, err


async def test_a_finished_rebuild_keeps_its_image_in_status_json_and_the_api(
    driver_host: DriverHost, images: ImageServer, api: TestClient[Any, Any]
) -> None:
    url, sha = serve(images, "image B", "qcow2")
    host = driver_host.name
    code, out, err = await driver_host.cli(
        "start", "vm-1", "--host", host, "--image", url, "--sha256", sha, "--stop-timeout", "0", "--wait"
    )
    assert code == ExitCode.OK, (out, err)
    code, out, err = await driver_host.cli("status", "vm-1", "--host", host)
    assert code == ExitCode.OK, err
    assert f"  image: {url}\n" in out
    assert f"  image sha256: {sha}\n" in out
    code, out, err = await driver_host.cli("status", "vm-1", "--host", host, "--json")
    shown = json.loads(out)
    assert (shown["status"]["image_url"], shown["result"]["image_url"]) == (url, url)
    response = await api.get(f"/v1/rebuilds/{host}/vm-1", headers=AUTH)
    assert response.status == 200
    body = await response.json()
    assert (body["status"]["image_url"], body["result"]["image_url"]) == (url, url)


async def test_a_terminated_rebuild_still_names_its_image(
    driver_host: DriverHost, images: ImageServer, client: Client
) -> None:
    url, _ = serve(images, "image B", "qcow2")
    host = driver_host.name
    code, _, err = await driver_host.cli(
        "start", "vm-1", "--host", host, "--image", url, "--require-approval"
    )
    assert code == ExitCode.OK, err
    await client.get_workflow_handle(rebuild_workflow_id(host, "vm-1")).terminate("test")
    code, out, _ = await driver_host.cli("status", "vm-1", "--host", host)
    assert code == ExitCode.ENDED_WITHOUT_RESULT
    assert f"  image: {url}\n" in out


def rebuild_now(*args: str) -> subprocess.CompletedProcess[str]:
    """``rebuild ARGS`` refused before it reaches Temporal (the address leads nowhere)."""
    env = dict(os.environ, TEMPORAL_ADDRESS="127.0.0.1:1", **NARROW)
    return subprocess.run([str(BIN / "rebuild"), *args], capture_output=True, text=True, env=env, timeout=60)


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["--image", "notaurl"], "--image: image URL must be http://, https:// or file:///: 'notaurl'"),
        (
            ["--image", "http://x/y", "--snapshot", "ab" * 16],
            "name the image by exactly one of: --image, --glance-image (with --glance), --snapshot",
        ),
        (
            ["--glance-image", "6f1c3d1e-8a8b-4c7e-9a55-0c7d3f2b1a90"],
            "a Glance image needs both --glance-image and --glance",
        ),
        (["--image", "http://x/y", "--sha256", "abc"], "--sha256: must be 64 hexadecimal characters"),
        (["--image", "http://x/y", "--stop-timeout", "-1"], "--stop-timeout: Input should be greater"),
        (
            ["--image", "http://x/y", "--boot-marker", "m", "--verify", "agent"],
            "give either --boot-marker or --verify, not both",
        ),
    ],
)
def test_refusals_name_the_options_not_the_fields(args: list[str], said: str) -> None:
    done = rebuild_now("start", "vm-1", "--host", "h", *args)
    assert done.returncode == ExitCode.BAD_INPUT, done.stderr
    assert said in done.stderr
    for field in ("image_url", "glance_image_id", "glance_url", "snapshot_id", "stop_timeout_seconds"):
        assert field not in done.stderr


def test_fleet_refusals_name_the_options_too() -> None:
    done = rebuild_now("fleet", "start", "--image", "notaurl", "--select", "web-*", "--host", "h")
    assert done.returncode == ExitCode.BAD_INPUT
    assert "--image: image URL must be" in done.stderr
    assert "image_url" not in done.stderr
    batch = rebuild_now(
        "fleet", "start", "--image", "http://x/y", "--select", "w*", "--host", "h", "--batch", "0"
    )
    assert batch.returncode == ExitCode.BAD_INPUT
    assert "--batch: Input should be greater than or equal to 1" in batch.stderr


async def interrupted(address: str, *args: str, once: str) -> tuple[int, str, str]:
    """``rebuild ARGS``, interrupted by Ctrl-C (SIGINT) once its stderr or stdout shows ``once``."""
    process = await asyncio.create_subprocess_exec(
        str(BIN / "rebuild"),
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=dict(os.environ, TEMPORAL_ADDRESS=address, **NARROW),
    )
    stderr = process.stderr
    assert stderr is not None
    seen = b""

    async def read_until_shown() -> None:
        nonlocal seen
        while once.encode() not in seen:
            chunk = await stderr.read(200)
            if not chunk:
                raise AssertionError(f"{args} ended before showing {once!r}: {seen!r}")
            seen += chunk

    await asyncio.wait_for(read_until_shown(), 60)
    process.send_signal(signal.SIGINT)
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, out.decode(), (seen + err).decode()


async def test_ctrl_c_during_wait_says_the_rebuild_goes_on_and_how_to_follow_or_abort_it(
    driver_host: DriverHost, images: ImageServer, client: Client
) -> None:
    url, sha = serve(images, "image B", "qcow2")
    host = driver_host.name
    target = f"vm-1 --host {host}"
    code, _, err = await interrupted(
        driver_host.address,
        "start", "vm-1", "--host", host, "--image", url, "--sha256", sha, "--require-approval", "--wait",
        once="phase: await-approval",
    )  # fmt: skip
    assert code == ExitCode.INTERRUPTED, err
    assert "interrupted; the rebuild goes on" in err
    assert f"Follow it: rebuild watch {target}" in " ".join(err.split())
    assert f"abort it: rebuild abort {target} --reason TEXT" in " ".join(err.split())
    assert "Traceback" not in err
    handle = client.get_workflow_handle(rebuild_workflow_id(host, "vm-1"))
    assert (await handle.describe()).status == WorkflowExecutionStatus.RUNNING
    code, _, err = await driver_host.cli("abort", "vm-1", "--host", host, "--reason", "test over")
    assert code == ExitCode.OK, err


def test_cache_list_says_which_state_directory_it_read(tmp_path: Path) -> None:
    uri = ["--libvirt-uri", "test:///default"]
    given = rebuild_now("cache", "list", "--state-dir", str(tmp_path), *uri)
    assert given.returncode == ExitCode.OK, given.stderr
    lines = given.stdout.splitlines()
    assert lines[0] == f"state directory: {tmp_path} (--state-dir or REBUILD_STATE_DIR)"
    assert lines[1] == f"no cached images in {tmp_path / 'images'}"
    by_default = rebuild_now("cache", "list", *uri)
    assert by_default.stdout.startswith(
        f"state directory: {DEFAULT_STATE_DIR} (the worker's default; --state-dir or REBUILD_STATE_DIR"
    )
    missing = rebuild_now("cache", "prune", "--dry-run", "--state-dir", str(tmp_path / "nope"), *uri)
    assert "it does not exist: is the worker's --state-dir another?" in missing.stdout


def test_cache_and_worker_and_demo_share_one_default_state_directory() -> None:
    defaults = {p.name: p.default for p in typer.main.get_command(worker.app).params}
    assert defaults["state_dir"] == DEFAULT_STATE_DIR
    assert str(DEFAULT_STATE_DIR) in " ".join(rebuild_now("cache", "list", "--help").stdout.split())
    assert demo.STATE == DEFAULT_STATE_DIR or "REBUILD_STATE_DIR" in os.environ


async def replayed_and_recorded(handle: WorkflowHandle[Any, Any], name: str) -> None:
    """The run replays on today's code (saved for the replay test with REBUILD_RECORD_HISTORIES=1)."""
    replayer = Replayer(workflows=[RebuildInstance], data_converter=pydantic_data_converter)
    await replayer.replay_workflow(await handle.fetch_history())
    await record_patched_history(handle, name, PATCH_CURRENT_IMAGE)


async def test_start_without_an_image_rebuilds_from_the_current_one_or_says_none_is_recorded(
    driver_host: DriverHost, images: ImageServer, client: Client
) -> None:
    host = driver_host.name
    code, out, err = await driver_host.cli("start", "vm-1", "--host", host, "--stop-timeout", "0")
    assert code == ExitCode.BAD_INPUT, (out, err)
    assert "instance 'vm-1' records no image in its <metadata>" in err
    assert "name the image to rebuild it from" in err
    handle = client.get_workflow_handle(rebuild_workflow_id(host, "vm-1"))
    await replayed_and_recorded(handle, "rebuild-refused-no-image-recorded")

    url, sha = serve(images, "image B", "qcow2")
    code, _, err = await driver_host.cli(
        "start", "vm-1", "--host", host, "--image", url, "--sha256", sha, "--stop-timeout", "0", "--wait"
    )
    assert code == ExitCode.OK, err
    code, out, err = await driver_host.cli("start", "vm-1", "--host", host, "--stop-timeout", "0", "--wait")
    assert code == ExitCode.OK, err
    assert f"image sha256 {sha}" in out
    code, out, _ = await driver_host.cli("status", "vm-1", "--host", host)
    assert f"  image: {url}\n" in out
    await replayed_and_recorded(handle, "rebuild-from-current-image")
    downloads = [r for r in images.requests if r.path == "image-B.qcow2" and r.status in (200, 206)]
    assert len(downloads) == 1  # the reinstall found the recorded image in the host's cache


def test_a_digest_without_an_image_and_a_fleet_without_one_are_refused() -> None:
    digest = rebuild_now("start", "vm-1", "--host", "h", "--sha256", "ab" * 32)
    assert digest.returncode == ExitCode.BAD_INPUT
    assert "--sha256, --sha512 and --disk-format go with the image they describe" in digest.stderr
    fleet = rebuild_now("fleet", "start", "--select", "w*", "--host", "h")
    assert fleet.returncode == ExitCode.BAD_INPUT
    assert "name the fleet's image by --image or --glance-image (with --glance)" in fleet.stderr


async def test_fleet_start_gives_every_rebuild_the_options_rebuild_start_has(
    driver_host: DriverHost, images: ImageServer, client: Client, tmp_path: Path
) -> None:
    url, sha = serve(images, "image B", "qcow2")
    host = driver_host.name
    listed = tmp_path / "instances"
    listed.write_text(f"{host} vm-1\n")
    code, out, err = await driver_host.cli(
        "fleet", "start", "--instances-file", str(listed), "--image", url, "--checksum", f"sha256:{sha}",
        "--verify", "console:login:", "--require-approval", "--approval-timeout", "600",
        "--confirm-within", "60", "--revert-by-default", "--metadata", "role=web", "--name", "f-opts",
    )  # fmt: skip
    assert code == ExitCode.OK, (out, err)
    child = client.get_workflow_handle(rebuild_workflow_id(host, "vm-1"))
    for _ in range(200):
        code, out, _ = await driver_host.cli("status", "vm-1", "--host", host)
        if "phase: await-approval" in out:
            break
        await asyncio.sleep(0.2)
    assert "phase: await-approval" in out
    async for event in child.fetch_history_events():
        payloads = event.workflow_execution_started_event_attributes.input.payloads
        (request,) = await client.data_converter.decode(payloads, [RebuildRequest])
        break
    assert (request.sha256, request.verify, request.require_approval) == (sha, "console:login:", True)
    assert (request.approval_timeout_seconds, request.confirm_within_seconds) == (600, 60)
    assert request.revert_by_default and request.identity.metadata == {"role": "web"}
    code, _, err = await driver_host.cli("fleet", "abort", "f-opts", "--reason", "test over")
    assert code == ExitCode.OK, err


def test_fleet_start_has_every_option_of_rebuild_start_but_the_per_instance_ones() -> None:
    commands = typer.main.get_command(app).commands  # type: ignore[attr-defined]
    single = {p.name: p for p in commands["start"].params}
    fleet = {p.name: p for p in commands["fleet"].commands["start"].params}
    per_instance = {"instance", "snapshot", "host", "hostname", "name", "description", "root_disk"}
    per_instance |= {"discard_snapshots"}
    # A fleet's dry run (a plan per instance) is not there yet.
    per_instance |= {"dry_run"}
    assert set(single) - set(fleet) - per_instance == set()
    for name in set(single) & set(fleet) - {"host", "name", "wait"}:
        assert single[name].help == fleet[name].help, name  # one definition: one text


async def test_the_api_answers_a_start_once_past_inspect_and_refuses_an_unknown_instance_with_400(
    driver_host: DriverHost, images: ImageServer, api: TestClient[Any, Any]
) -> None:
    url, sha = serve(images, "image B", "qcow2")
    body = {"host": driver_host.name, "image_url": url, "sha256": sha, "require_approval": True}
    refused = await api.post("/v1/rebuilds", json={**body, "instance": "no-such-vm"}, headers=AUTH)
    assert refused.status == 400
    assert "instance 'no-such-vm' is not defined on this host" in (await refused.json())["error"]
    started = await api.post("/v1/rebuilds", json={**body, "instance": "vm-1"}, headers=AUTH)
    assert started.status == 201
    assert (await started.json())["phase"] not in (None, "pending", "inspect")
    code, _, err = await driver_host.cli("abort", "vm-1", "--host", driver_host.name, "--reason", "test over")
    assert code == ExitCode.OK, err


# Point 5: following a rebuild shows every phase, the download's speed and ETA, the stop's window.
# The worker swaps the root disk in one step (stop, prepare and start in one activity): prepare and
# start are no phases of their own, their times are in the steps.
EVERY_PHASE = ["inspect", "fetch", "check", "stage", "stop", "verify", "cleanup", "done"]
DOWNLOAD_LINE = re.compile(r"^  fetch: [\d.]+/4\.2 MB \d+%, [\d.]+ [kM]B/s, 0:00:\d\d left$")


def slowly_served(images: ImageServer) -> tuple[str, str]:
    """A 4 MiB raw image at 64 KiB per 80 ms: a download of about 5 s, with heartbeats on the way."""
    url, sha = serve(images, "image B", "raw")
    images.faults[url.rsplit("/", 1)[1]] = Fault(seconds_per_chunk=0.08)
    return url, sha


async def start_slowly_served_rebuild(driver_host: DriverHost, images: ImageServer) -> str:
    """``rebuild start vm-1`` (no --wait) from a slowly served image, for a follower to watch; the host."""
    url, sha = slowly_served(images)
    host = driver_host.name
    code, _, err = await driver_host.cli("start", "vm-1", "--host", host, "--image", url, "--sha256", sha)
    assert code == ExitCode.OK, err
    return host


def phases_shown(text: str) -> list[str]:
    return [line.split()[1] for line in text.splitlines() if line.startswith("  phase: ")]


def too_wide(text: str) -> list[str]:
    return [line for line in text.splitlines() if len(line) > 80]


async def test_wait_shows_every_phase_in_order_and_the_download_with_speed_and_eta(
    driver_host: DriverHost, images: ImageServer
) -> None:
    url, sha = slowly_served(images)
    code, out, err = await driver_host.cli(
        "start", "vm-1", "--host", driver_host.name, "--image", url, "--sha256", sha, "--wait"
    )
    assert code == ExitCode.OK, (out, err)
    assert phases_shown(err) == EVERY_PHASE, err
    downloads = [line for line in err.splitlines() if DOWNLOAD_LINE.match(line)]
    assert downloads, err
    lines = err.splitlines()
    assert lines.index("  phase: fetch" + lines[1].partition("fetch")[2]) < lines.index(downloads[0])
    assert too_wide(err) == []
    assert out.startswith("rebuilt vm-1 on ")
    code, out, err = await driver_host.cli(
        "start", "vm-1", "--host", driver_host.name, "--stop-timeout", "0", "--wait", "--json"
    )
    assert code == ExitCode.OK, err
    assert json.loads(out)["outcome"] == "rebuilt" and err == ""  # --json: machine output only


async def test_watch_shows_no_download_before_the_fetch_and_its_speed_and_eta_during_it(
    driver_host: DriverHost, images: ImageServer
) -> None:
    host = await start_slowly_served_rebuild(driver_host, images)
    code, out, err = await driver_host.cli("watch", "vm-1", "--host", host)
    assert code == ExitCode.OK, (out, err)
    assert phases_shown(out) == EVERY_PHASE, out
    lines = out.splitlines()
    fetch_at = next(i for i, line in enumerate(lines) if line.startswith("  phase: fetch"))
    check_at = next(i for i, line in enumerate(lines) if line.startswith("  phase: check"))
    downloads = [i for i, line in enumerate(lines) if line.startswith("  fetch:")]
    assert downloads and all(fetch_at < i < check_at for i in downloads), out
    assert all(DOWNLOAD_LINE.match(lines[i]) for i in downloads), out
    assert "0/?" not in out and "?" not in out.replace("speed ?", "")
    steps = " ".join(line.strip() for line in lines if line.startswith(("  steps: ", "    ")))
    for step in ("inspect", "fetch", "check", "stage", "stop", "prepare", "start", "verify", "cleanup"):
        assert f"{step} " in steps, out
    assert too_wide(out) == []
    assert lines[-1].endswith(": COMPLETED")


def read_all(fd: int) -> bytes:
    """Everything a pty's far side writes, until it closes (EIO on Linux)."""
    chunks: list[bytes] = []
    while True:
        try:
            chunk = os.read(fd, 4096)
        except OSError:
            return b"".join(chunks)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


async def on_terminal(address: str, *args: str) -> tuple[int, str]:
    """``rebuild ARGS`` on an 80-column terminal (a pty): its exit code and what the terminal got."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    process = await asyncio.create_subprocess_exec(
        str(BIN / "rebuild"), *args, stdin=asyncio.subprocess.DEVNULL, stdout=follower, stderr=follower,
        env=dict(os.environ, TEMPORAL_ADDRESS=address, TERM="xterm", **NARROW),
    )  # fmt: skip
    os.close(follower)
    reading = asyncio.get_running_loop().run_in_executor(None, read_all, leader)
    code = await asyncio.wait_for(process.wait(), 120)
    shown = await asyncio.wait_for(reading, 30)
    os.close(leader)
    return code, shown.decode()


ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


async def test_watch_on_a_terminal_shows_a_live_download_line_that_fits_80_columns(
    driver_host: DriverHost, images: ImageServer
) -> None:
    host = await start_slowly_served_rebuild(driver_host, images)
    code, shown = await on_terminal(driver_host.address, "watch", "vm-1", "--host", host)
    assert code == ExitCode.OK, shown
    rows = [row for row in re.split(r"[\r\n]", ANSI.sub("", shown)) if row.strip()]
    live = [row for row in rows if row.startswith("  fetch: ")]
    assert live and all(re.search(r" [\d.]+/4\.2 MB \d+%, [\d.]+ [kM]B/s, 0:00:\d\d left$", r) for r in live)
    first_fetch = next(i for i, row in enumerate(rows) if row.startswith("  phase: fetch"))
    assert all(rows.index(row) > first_fetch for row in live)
    assert "0/?" not in shown
    assert [row for row in rows if len(row) > 80] == []
    assert phases_shown("\n".join(rows)) == EVERY_PHASE
