"""Publishing a snapshot to Glance: the activity against a fake Glance v2, and the whole story on real
guests: a snapshot of one instance, published, is the image another instance is rebuilt from."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from temporalio.testing import ActivityEnvironment

from activities.errors import InvalidRequest, SnapshotNotFound, UnsafeImage
from activities.glance_publish import SnapshotPublisher
from activities.state import StateDir
from devtools.temporal_dev import DevServer
from devtools.testbed.e2e import LOOPBACK_POLICY, Guest, WorkerProcess, make_guest, rebuild_cli
from devtools.testbed.glance import FakeGlance, endpoint_for, running_glance
from tests.test_cache import cache
from tests.test_snapshot_store import record
from workflows.snapshot_models import PublishSnapshotInput

env = ActivityEnvironment()


@pytest.fixture
async def glance(tmp_path: Path) -> AsyncIterator[FakeGlance]:
    async with running_glance(tmp_path) as server:
        yield server


def publisher(state: StateDir, glance: FakeGlance | None, tmp_path: Path) -> SnapshotPublisher:
    endpoint = endpoint_for(glance, tmp_path / "token") if glance else None
    return SnapshotPublisher(state, endpoint, LOOPBACK_POLICY)


async def test_a_snapshot_becomes_an_active_glance_image_holding_its_bytes(
    glance: FakeGlance, tmp_path: Path
) -> None:
    state = StateDir(tmp_path / "state")
    snapshot = record(state, cache(state, "snap", 0))
    published = await env.run(
        publisher(state, glance, tmp_path).publish_snapshot,
        PublishSnapshotInput(snapshot_id=snapshot.snapshot_id),
    )
    image = glance.records[published.glance_image_id]
    assert image["status"] == "active" and image["disk_format"] == "qcow2"
    assert Path(image["path"]).read_bytes() == state.image_path(snapshot.sha256).read_bytes()
    assert image["rebuild_snapshot_id"] == snapshot.snapshot_id
    assert image["visibility"] == "private"


async def test_a_retry_fills_the_image_the_first_attempt_created(glance: FakeGlance, tmp_path: Path) -> None:
    state = StateDir(tmp_path / "state")
    snapshot = record(state, cache(state, "snap", 0))
    activity = publisher(state, glance, tmp_path).publish_snapshot
    glance.corrupt_next_upload = True  # the first upload is stored wrong: its check fails
    with pytest.raises(UnsafeImage, match="does not hold"):
        await env.run(activity, PublishSnapshotInput(snapshot_id=snapshot.snapshot_id))
    first = next(iter(glance.records))
    glance.records[first]["status"] = "queued"  # as Glance leaves an image whose upload broke off
    published = await env.run(activity, PublishSnapshotInput(snapshot_id=snapshot.snapshot_id))
    assert published.glance_image_id == first
    assert len(glance.records) == 1


async def test_publish_refuses_what_it_cannot_do(glance: FakeGlance, tmp_path: Path) -> None:
    state = StateDir(tmp_path / "state")
    snapshot = record(state, cache(state, "snap", 0))
    with pytest.raises(InvalidRequest, match="no Glance endpoint"):
        await env.run(
            publisher(state, None, tmp_path).publish_snapshot, PublishSnapshotInput(snapshot_id="a" * 32)
        )
    with pytest.raises(SnapshotNotFound):
        await env.run(
            publisher(state, glance, tmp_path).publish_snapshot, PublishSnapshotInput(snapshot_id="a" * 32)
        )
    with pytest.raises(InvalidRequest, match="snapshot ID"):
        await env.run(
            publisher(state, glance, tmp_path).publish_snapshot, PublishSnapshotInput(snapshot_id="../x")
        )
    with pytest.raises(InvalidRequest, match="name"):
        request = PublishSnapshotInput(snapshot_id=snapshot.snapshot_id, name="a\nb")
        await env.run(publisher(state, glance, tmp_path).publish_snapshot, request)
    assert glance.records == {}


async def test_a_published_snapshot_of_one_instance_rebuilds_another(
    libvirt_conn: Any,
    guests: list[Guest],
    guest_dir: Path,
    glance: FakeGlance,
    dev_server: DevServer,
    unique_host: str,
    tmp_path: Path,
    reachable_tmp: Path,
) -> None:
    token = tmp_path / "glance-token"
    endpoint_for(glance, token)
    worker = WorkerProcess(
        unique_host, reachable_tmp / "state", dev_server.address, tmp_path / "worker.log",
        extra_args=("--glance-url", glance.url, "--glance-token-file", str(token), "--glance-allow-http"),
    )  # fmt: skip
    worker.start()
    try:
        golden = make_guest(libvirt_conn, guest_dir, "golden image")
        other = make_guest(libvirt_conn, guest_dir, "image A")
        guests.extend([golden, other])
        made = await rebuild_cli(
            dev_server.address, "snapshot", "create", golden.name, "--host", worker.host, "--json"
        )
        assert made.code == 0, made.stderr
        snapshot_id = made.json()["snapshot_id"]
        published = await rebuild_cli(
            dev_server.address, "snapshot", "publish", snapshot_id, "--host", worker.host, "--json"
        )
        assert published.code == 0, published.stderr
        image_id = published.json()["glance_image_id"]

        rebuilt = await rebuild_cli(
            dev_server.address,
            "start", other.name, "--glance", glance.url, "--glance-image", image_id, "--host", worker.host,
            "--stop-timeout", "0", "--boot-marker", "golden image", "--boot-timeout", "20",
            "--wait", "--json",
        )  # fmt: skip
        assert rebuilt.code == 0, rebuilt.stdout + rebuilt.stderr
        assert json.loads(rebuilt.stdout)["image_url"] == f"glance:{image_id}"
        assert "golden image" in other.console()
    finally:
        worker.stop()
