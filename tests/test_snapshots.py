"""Snapshots on real guests: taken while the guest runs (it is never stopped), put back by a rebuild.

Each boot-sector guest prints its image's name on the serial console: a guest rebuilt from a snapshot
of its "image A" days, after a rebuild to image B, must print "image A" again.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from pathlib import Path
from typing import Any

import libvirt

from devtools.image_server import ImageServer
from devtools.temporal_dev import DevServer
from devtools.testbed.e2e import Guest, WorkerProcess, rebuild_cli, serve, wait_for_file
from workflows.snapshot_models import snapshot_workflow_id


async def snapshot(dev_server: DevServer, worker: WorkerProcess, guest: Guest, *extra: str) -> dict[str, Any]:
    made = await rebuild_cli(
        dev_server.address, "snapshot", "create", guest.name, "--host", worker.host, "--json", *extra
    )
    assert made.code == 0, made.stdout + made.stderr
    return made.json()


async def rebuild(
    dev_server: DevServer, worker: WorkerProcess, guest: Guest, *source: str, marker: str
) -> Any:
    done = await rebuild_cli(
        dev_server.address,
        "start", guest.name, *source, "--host", worker.host, "--stop-timeout", "0",
        "--boot-marker", marker, "--boot-timeout", "20", "--wait", "--json",
    )  # fmt: skip
    assert done.code == 0, done.stdout + done.stderr
    return done.json()


def image_in_cache(worker: WorkerProcess, sha256: str) -> Path:
    return worker.state_dir / "images" / sha256


async def test_a_running_guest_is_snapshotted_without_a_stop_and_rebuilt_from_it(
    guest: Guest, worker: WorkerProcess, images: ImageServer, dev_server: DevServer
) -> None:
    guest.wait_for_console("image A")
    before = guest.identity()
    running_as = guest.domain.ID()
    record = await snapshot(dev_server, worker, guest, "--label", "known good")

    # The guest ran on: the same QEMU process, no second boot.
    assert guest.domain.isActive() and guest.domain.ID() == running_as
    assert guest.console().count("image A") == 1
    assert record["consistency"] == "crash-consistent"  # boot-sector guests have no agent
    assert record["instance_uuid"] == guest.domain.UUIDString()
    assert record["label"] == "known good"
    cached = image_in_cache(worker, record["sha256"])
    info = json.loads(subprocess.run(
        ["qemu-img", "info", "--output=json", str(cached)], capture_output=True, text=True, check=True
    ).stdout)  # fmt: skip
    assert info["format"] == "qcow2" and "backing-filename" not in info
    assert list((worker.state_dir / "snapshots" / "partial").iterdir()) == []

    url, sha = serve(images, "image B", "raw")
    await rebuild(dev_server, worker, guest, "--image", url, "--sha256", sha, marker="image B")
    since = len(guest.console())
    put_back = await rebuild(dev_server, worker, guest, "--snapshot", record["snapshot_id"], marker="image A")

    assert put_back["image_sha256"] == record["sha256"]
    assert "image A" in guest.console()[since:]
    assert guest.identity() == before  # the same UUID, MACs and data disk
    assert guest.domain.UUIDString() == record["instance_uuid"]
    status = await rebuild_cli(dev_server.address, "status", guest.name, "--host", worker.host, "--json")
    assert status.json()["status"]["image_url"] == f"snapshot:{record['snapshot_id']}"


async def test_a_shut_off_guest_is_copied_and_the_copy_boots(
    guest: Guest, worker: WorkerProcess, images: ImageServer, dev_server: DevServer
) -> None:
    guest.domain.destroy()
    record = await snapshot(dev_server, worker, guest)
    assert record["consistency"] == "shut-off"
    assert not guest.domain.isActive()

    url, sha = serve(images, "image B", "qcow2")
    await rebuild(dev_server, worker, guest, "--image", url, "--sha256", sha, "--start", marker="image B")
    since = len(guest.console())
    await rebuild(dev_server, worker, guest, "--snapshot", record["snapshot_id"], marker="image A")
    assert "image A" in guest.console()[since:]


async def test_list_retention_delete_and_pruning_keep_what_they_should(
    guest: Guest, worker: WorkerProcess, dev_server: DevServer
) -> None:
    first = await snapshot(dev_server, worker, guest)
    second = await snapshot(dev_server, worker, guest)
    third = await snapshot(dev_server, worker, guest, "--keep", "2")

    listed = await rebuild_cli(
        dev_server.address, "snapshot", "list", "--host", worker.host, "--instance", guest.name, "--json"
    )
    assert listed.code == 0, listed.stderr
    rows: list[dict[str, Any]] = json.loads(listed.stdout)
    assert [r["snapshot_id"] for r in rows] == [second["snapshot_id"], third["snapshot_id"]]

    # The cache's pruning keeps every image a snapshot record names, however old.
    pruned = subprocess.run(
        [str(Path(".venv/bin/rebuild")), "cache", "prune", "--max-age-days", "0", "--state-dir",
         str(worker.state_dir), "--json"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert pruned.returncode == 0, pruned.stderr
    assert image_in_cache(worker, third["sha256"]).exists()

    deleted = await rebuild_cli(
        dev_server.address, "snapshot", "delete", second["snapshot_id"], "--host", worker.host, "--json"
    )
    assert deleted.code == 0, deleted.stderr
    assert deleted.json()["deleted"] == [second["snapshot_id"]]
    shown = await rebuild_cli(
        dev_server.address, "snapshot", "show", first["snapshot_id"], "--host", worker.host
    )
    assert shown.code == 2 and first["snapshot_id"] in shown.stderr
    unknown = await rebuild_cli(
        dev_server.address, "snapshot", "delete", "0" * 32, third["snapshot_id"], "--host", worker.host
    )
    assert unknown.code == 2 and "0" * 32 in unknown.stderr
    left = await rebuild_cli(dev_server.address, "snapshot", "list", "--host", worker.host, "--json")
    assert [r["snapshot_id"] for r in json.loads(left.stdout)] == [third["snapshot_id"]]


async def test_bad_snapshot_requests_exit_2_and_change_nothing(
    guest: Guest, worker: WorkerProcess, dev_server: DevServer
) -> None:
    args = ("--host", worker.host)
    no_agent = await rebuild_cli(dev_server.address, "snapshot", "create", guest.name, "--quiesce", *args)
    assert no_agent.code == 2, no_agent.stderr
    assert "guest agent" in no_agent.stderr
    unknown = await rebuild_cli(dev_server.address, "snapshot", "create", "no-such-vm", *args)
    assert unknown.code == 2, unknown.stderr
    bad_keep = await rebuild_cli(dev_server.address, "snapshot", "create", guest.name, "--keep", "0", *args)
    assert bad_keep.code == 2 and "keep" in bad_keep.stderr
    bad_id = await rebuild_cli(dev_server.address, "start", guest.name, "--snapshot", "../etc", *args)
    assert bad_id.code == 2 and "snapshot ID" in bad_id.stderr
    both = await rebuild_cli(
        dev_server.address, "start", guest.name, "--snapshot", "a" * 32, "--image", "http://x/y", *args
    )
    assert both.code == 2 and "exactly one" in both.stderr

    assert guest.domain.isActive()
    assert list((worker.state_dir / "snapshots").glob("*.json")) == []
    assert list((worker.state_dir / "snapshots" / "partial").iterdir()) == []


async def test_a_worker_killed_mid_snapshot_leaves_a_whole_snapshot_or_none(
    guest: Guest, worker: WorkerProcess, dev_server: DevServer, client: Any
) -> None:
    assert worker.pause_dir is not None
    gate = worker.pause_dir / "snapshot.after-copy"
    gate.touch()
    task = asyncio.create_task(snapshot(dev_server, worker, guest))
    await wait_for_file(worker.pause_dir / "snapshot.after-copy.reached")
    worker.kill()
    gate.unlink()
    worker.start()
    record = await task

    assert guest.domain.isActive()
    assert image_in_cache(worker, record["sha256"]).exists()
    assert list((worker.state_dir / "snapshots" / "partial").iterdir()) == []
    handle = client.get_workflow_handle(snapshot_workflow_id(worker.host, guest.name))
    history = await handle.fetch_history()
    attempts = [
        e.activity_task_started_event_attributes.attempt
        for e in history.events
        if e.HasField("activity_task_started_event_attributes")
    ]
    assert max(attempts) >= 2  # the first attempt died with the worker; a second one finished


async def test_an_agent_channel_with_no_agent_behind_it_gives_a_crash_consistent_snapshot(
    guest: Guest, worker: WorkerProcess, dev_server: DevServer
) -> None:
    """The channel is defined, nobody answers on it (a guest without qemu-guest-agent): no freeze."""
    channel = "<channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>"
    xml = guest.domain.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE).replace("</devices>", f"{channel}</devices>")
    guest.domain.destroy()
    guest.conn.defineXML(xml)
    guest.domain.create()

    began = time.monotonic()
    record = await snapshot(dev_server, worker, guest)
    assert record["consistency"] == "crash-consistent" and record["frozen_ms"] is None
    assert time.monotonic() - began < 30  # the agent's silence costs its timeouts, not a retry loop
    quiesced = await rebuild_cli(
        dev_server.address, "snapshot", "create", guest.name, "--host", worker.host, "--quiesce"
    )
    assert quiesced.code == 2 and "did not freeze" in quiesced.stderr
    assert not (worker.state_dir / "snapshots" / "partial").exists() or not any(
        (worker.state_dir / "snapshots" / "partial").iterdir()
    )
