"""Where images come from: SHA-512, file:// inside an allowed directory, and Glance v2 image IDs."""

from __future__ import annotations

import asyncio
import hashlib
import json
import subprocess
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from temporalio.client import Client
from temporalio.testing import ActivityEnvironment
from temporalio.worker import Worker

from activities.errors import ChecksumMismatch, ImageNotFound, InvalidRequest, UnsafeImage
from activities.glance import GlanceActivities
from activities.images import ImageActivities
from activities.state import StateDir
from devtools.guest import write_image
from devtools.image_server import ImageServer
from devtools.testbed.e2e import LOOPBACK_NETWORKS, LOOPBACK_POLICY, serve
from devtools.testbed.glance import TOKEN, FakeGlance, endpoint_for, running_glance
from devtools.testbed.libvirt_test_driver import make_instances
from worker import WorkerConfig, host_activities
from workflows.models import (
    CheckImageInput,
    FetchImageInput,
    RebuildRequest,
    ResolveGlanceImageInput,
    host_task_queue,
    rebuild_workflow_id,
)
from workflows.rebuild import RebuildInstance

env = ActivityEnvironment()
LIMIT = 1 << 30


def check_input(sha: str, declared: str) -> CheckImageInput:
    return CheckImageInput.model_validate(
        {"sha256": sha, "max_virtual_size_bytes": LIMIT, "declared_format": declared}
    )


def fetch(url: str, **digests: str) -> FetchImageInput:
    return FetchImageInput(url=url, max_bytes=LIMIT, **digests)


async def test_sha512_is_checked_and_names_a_cache_hit(tmp_path: Path, images: ImageServer) -> None:
    url, sha256 = serve(images, "image B", "raw")
    sha512 = hashlib.sha512((images.directory / "image-B.raw").read_bytes()).hexdigest()
    activities = ImageActivities(StateDir(tmp_path / "state"), address_policy=LOOPBACK_POLICY)
    first = await env.run(activities.fetch_image, fetch(url, sha512=sha512))
    assert first.sha256 == sha256
    requests = len(images.requests)
    again = await env.run(activities.fetch_image, fetch(url, sha512=sha512))
    assert again.cache_hit
    assert len(images.requests) == requests
    with pytest.raises(ChecksumMismatch, match="SHA-512"):
        await env.run(activities.fetch_image, fetch(url, sha512="0" * 128))


async def test_file_images_only_from_the_allowed_directory(tmp_path: Path) -> None:
    allowed = tmp_path / "images"
    allowed.mkdir()
    image = write_image(allowed / "b.raw", "image B")
    (allowed / "escape.raw").symlink_to("/etc/hostname")
    state = StateDir(tmp_path / "state")
    activities = ImageActivities(state, file_image_dir=allowed, address_policy=LOOPBACK_POLICY)

    cached = await env.run(activities.fetch_image, fetch(f"file://{image}"))
    assert cached.sha256 == hashlib.sha256(image.read_bytes()).hexdigest()
    assert state.image_path(cached.sha256).read_bytes() == image.read_bytes()

    for outside in ("/etc/hostname", f"{allowed}/escape.raw", f"{allowed}/../images/../../etc/passwd"):
        with pytest.raises(InvalidRequest, match="outside"):
            await env.run(activities.fetch_image, fetch(f"file://{outside}"))
    with pytest.raises(InvalidRequest, match="not enabled"):
        await env.run(
            ImageActivities(state, address_policy=LOOPBACK_POLICY).fetch_image, fetch(f"file://{image}")
        )


async def test_two_fetches_of_one_url_without_digest_download_once(
    tmp_path: Path, images: ImageServer
) -> None:
    url, _ = serve(images, "image B", "raw", size=16 << 20)
    activities = ImageActivities(StateDir(tmp_path / "state"), address_policy=LOOPBACK_POLICY)
    results = await asyncio.gather(
        ActivityEnvironment().run(activities.fetch_image, fetch(url)),
        ActivityEnvironment().run(activities.fetch_image, fetch(url)),
    )
    assert len([r for r in images.requests if r.status == 200]) == 1
    assert results[0].sha256 == results[1].sha256


async def test_declared_format_must_match_the_header(tmp_path: Path, images: ImageServer) -> None:
    url, sha = serve(images, "image B", "raw")
    state = StateDir(tmp_path / "state")
    activities = ImageActivities(state, address_policy=LOOPBACK_POLICY)
    await env.run(activities.fetch_image, fetch(url, sha256=sha))
    with pytest.raises(UnsafeImage, match="declared qcow2, its header says raw"):
        await env.run(
            activities.check_image,
            CheckImageInput(sha256=sha, max_virtual_size_bytes=LIMIT, declared_format="qcow2"),
        )
    assert state.image_path(sha).exists()  # the image is fine as what it is
    checked = await env.run(
        activities.check_image,
        CheckImageInput(sha256=sha, max_virtual_size_bytes=LIMIT, declared_format="raw"),
    )
    assert checked.format == "raw"


def glance_activities(glance: FakeGlance, tmp_path: Path) -> GlanceActivities:
    return GlanceActivities(endpoint_for(glance, tmp_path / "token"), LOOPBACK_POLICY)


@pytest.fixture
async def glance(tmp_path: Path) -> AsyncIterator[FakeGlance]:
    async with running_glance(tmp_path) as server:
        yield server


async def test_glance_record_is_resolved(glance: FakeGlance, tmp_path: Path) -> None:
    image = write_image(tmp_path / "g.qcow2", "image G", fmt="qcow2")
    image_id = glance.add(image, min_disk=2)
    resolved = await env.run(
        glance_activities(glance, tmp_path).resolve_glance_image,
        ResolveGlanceImageInput(glance_url=glance.url, image_id=image_id),
    )
    assert resolved.url == f"{glance.url}/v2/images/{image_id}/file"
    assert resolved.disk_format == "qcow2"
    assert resolved.sha512 == hashlib.sha512(image.read_bytes()).hexdigest()
    assert resolved.sha256 is None
    assert resolved.min_disk_bytes == 2 << 30


@pytest.mark.parametrize(
    ("fields", "error", "match"),
    [
        ({"status": "queued"}, ImageNotFound, "not active"),
        ({"disk_format": "vmdk"}, UnsafeImage, "disk_format 'vmdk'"),
    ],
)
async def test_glance_records_we_cannot_use_are_refused(
    glance: FakeGlance, tmp_path: Path, fields: dict[str, Any], error: type[Exception], match: str
) -> None:
    image_id = glance.add(write_image(tmp_path / "g.raw", "image G"), **fields)
    with pytest.raises(error, match=match):
        await env.run(
            glance_activities(glance, tmp_path).resolve_glance_image,
            ResolveGlanceImageInput(glance_url=glance.url, image_id=image_id),
        )


async def test_unknown_glance_image_is_not_found(glance: FakeGlance, tmp_path: Path) -> None:
    with pytest.raises(ImageNotFound):
        await env.run(
            glance_activities(glance, tmp_path).resolve_glance_image,
            ResolveGlanceImageInput(glance_url=glance.url, image_id=str(uuid.uuid4())),
        )


async def test_rebuild_from_a_glance_image_honours_min_disk(
    client: Client, unique_host: str, tmp_path: Path, glance: FakeGlance
) -> None:
    (vm,) = make_instances(tmp_path, ["vm-g"])
    image = write_image(tmp_path / "g.qcow2", "image G", fmt="qcow2")
    image_id = glance.add(image, min_disk=1)
    config = WorkerConfig(
        host=unique_host,
        libvirt_uri=vm.libvirt.uri,
        state_dir=tmp_path / "state",
        glance=endpoint_for(glance, tmp_path / "token"),
        allowed_image_networks=LOOPBACK_NETWORKS,
    )
    queue = f"wf-{unique_host}"
    async with (
        Worker(client, task_queue=queue, workflows=[RebuildInstance]),
        Worker(
            client, task_queue=host_task_queue(unique_host), activities=host_activities(config, vm.libvirt)
        ),
    ):
        result = await client.execute_workflow(
            RebuildInstance.run,
            RebuildRequest(
                instance=vm.name,
                host=unique_host,
                glance_url=glance.url,
                glance_image_id=image_id,
                stop_timeout_seconds=0,
            ),
            id=rebuild_workflow_id(unique_host, vm.name),
            task_queue=queue,
        )
    assert result.outcome == "rebuilt"
    assert result.image_sha256 == hashlib.sha256(image.read_bytes()).hexdigest()
    assert "resolve" in result.step_seconds
    assert glance.file_tokens == [TOKEN]
    info = json.loads(
        subprocess.run(
            ["qemu-img", "info", "-U", "--output=json", str(vm.disk)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    assert info["virtual-size"] == 1 << 30  # min_disk 1 GiB, though image and old disk are 1 MiB


async def test_an_image_is_fully_checked_once(
    tmp_path: Path, images: ImageServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, sha = serve(images, "image B", "qcow2")
    state = StateDir(tmp_path / "state")
    activities = ImageActivities(state, address_policy=LOOPBACK_POLICY)
    await env.run(activities.fetch_image, fetch(url, sha256=sha))
    first = await env.run(activities.check_image, check_input(sha, "qcow2"))
    assert state.check_verdict(sha).exists()

    async def no_qemu_img(*_: object) -> None:
        raise AssertionError("qemu-img ran again for an image already checked")

    monkeypatch.setattr("activities.image_check.qemu_img.image_info", no_qemu_img)
    again = await env.run(activities.check_image, check_input(sha, "qcow2"))
    assert again == first
    # The per-request rules still apply to a verdict from the cache.
    with pytest.raises(UnsafeImage, match="declared raw"):
        await env.run(activities.check_image, check_input(sha, "raw"))
