"""Issue 10, from the attacker's side: requests, image servers, Glance records and direct activity calls.

Each test stands where an attacker stands: a workflow of their own that calls a host's activities
through Temporal (anyone who reaches Temporal can), a Glance server that lies, an image server that
redirects, a URL that names an internal address. Nothing they say may reach outside its room.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from pydantic import BaseModel
from temporalio import workflow
from temporalio.client import Client
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError
from temporalio.testing import ActivityEnvironment
from temporalio.worker import Worker

from activities import image_format, qemu_img
from activities.errors import (
    DiskToolFailed,
    EmptyImage,
    ImageNotFound,
    ImageSourceRefused,
    ImageTooLarge,
    UnsafeImage,
)
from activities.glance import GlanceActivities, GlanceConfigError, GlanceEndpoint
from activities.images import ImageActivities
from activities.network import AddressPolicy, parse_networks
from activities.state import StateDir
from devtools.guest import write_image
from devtools.image_server import ImageServer
from devtools.temporal_dev import DevServer, free_port
from devtools.testbed.e2e import LOOPBACK_POLICY, rebuild_cli, serve
from devtools.testbed.fake_host import FakeHost
from devtools.testbed.libvirt_test_driver import make_instance
from worker import WorkerConfig, host_activities
from workflows.models import (
    WORKFLOW_TASK_QUEUE,
    CheckImageInput,
    FetchImageInput,
    RebuildRequest,
    ResolveGlanceImageInput,
    host_task_queue,
    legacy_rebuild_workflow_id,
    rebuild_workflow_id,
)

env = ActivityEnvironment()
TOKEN = "glance-secret"
GIB = 1 << 30
BIN = Path(sys.executable).parent


# --- the attacker's own workflow, calling a host's activities directly -----------------------------


class AttackCall(BaseModel):
    activity: str
    argument: dict[str, Any]
    queue: str


@workflow.defn(sandboxed=False)
class Attacker:
    """What anyone who reaches Temporal can run: any activity, on any host's queue, any input."""

    @workflow.run
    async def run(self, call: AttackCall) -> str:
        try:
            await workflow.execute_activity(
                call.activity,
                call.argument,
                task_queue=call.queue,
                start_to_close_timeout=timedelta(seconds=30),
                retry_policy=RetryPolicy(maximum_attempts=1),
            )
        except ActivityError as err:
            cause = err.cause
            if isinstance(cause, ApplicationError):
                return f"{cause.type}: {cause.message}"
            return f"failed: {cause}"
        return "accepted"


@pytest.fixture
async def attack(client: Client, unique_host: str, tmp_path: Path) -> AsyncIterator[Any]:
    """Runs an attacker's call against a real host worker (libvirt test driver, real state dir)."""
    (tmp_path / "host").mkdir()
    vm = make_instance(tmp_path / "host", running=False)
    config = WorkerConfig(host=unique_host, libvirt_uri=vm.libvirt.uri, state_dir=tmp_path / "host" / "state")
    queue = f"attacker-{unique_host}"

    async def call(activity: str, argument: dict[str, Any]) -> str:
        handle = await client.start_workflow(
            Attacker.run,
            AttackCall(activity=activity, argument=argument, queue=host_task_queue(unique_host)),
            id=f"attack-{uuid.uuid4()}",
            task_queue=queue,
        )
        result: str = await handle.result()
        return result

    call.vm = vm  # type: ignore[attr-defined]
    call.state = StateDir(config.state_dir)  # type: ignore[attr-defined]
    async with (
        Worker(client, task_queue=queue, workflows=[Attacker]),
        Worker(
            client, task_queue=host_task_queue(unique_host), activities=host_activities(config, vm.libvirt)
        ),
    ):
        yield call


async def test_check_image_refuses_a_path_for_a_digest_and_deletes_nothing(
    attack: Any, tmp_path: Path
) -> None:
    victim = tmp_path / "other-vm-disk.qcow2"
    victim.write_bytes(b"another instance's disk")
    answer = await attack(
        "check_image", {"sha256": "../../other-vm-disk.qcow2", "max_virtual_size_bytes": GIB}
    )
    assert answer.startswith("InvalidRequest: not a SHA-256 digest")
    assert victim.read_bytes() == b"another instance's disk"


async def test_prepare_refuses_a_host_file_as_backing_image(attack: Any) -> None:
    vm = attack.vm
    before = vm.disk.read_bytes()
    answer = await attack(
        "prepare_root_disk",
        {
            "instance": vm.name,
            "image_sha256": "../../../../etc/hostname",
            "image_format": "raw",
            "image_virtual_size": 1 << 20,
            "original_format": "raw",
            "rebuild_id": "attack",
        },
    )
    assert answer.startswith("InvalidRequest: not a SHA-256 digest")
    assert vm.disk.read_bytes() == before
    assert sorted(p.name for p in vm.disk.parent.glob(f"{vm.disk.name}.rebuild-*")) == []


async def test_prepare_refuses_a_petabyte_disk(attack: Any) -> None:
    vm = attack.vm
    sha = "0" * 64
    answer = await attack(
        "prepare_root_disk",
        {
            "instance": vm.name,
            "image_sha256": sha,
            "image_format": "raw",
            "image_virtual_size": 1 << 20,
            "original_format": "raw",
            "rebuild_id": "attack",
            "min_virtual_size": 1 << 50,
        },
    )
    assert answer.startswith("ImageTooLarge: minimum disk size")


async def test_fetch_refuses_a_path_for_a_digest_and_writes_nothing_outside(
    attack: Any, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    answer = await attack(
        "fetch_image",
        {"url": "http://images.invalid/x", "sha256": f"../../../outside/{'a' * 10}", "max_bytes": GIB},
    )
    assert answer.startswith("InvalidRequest")
    assert list(outside.iterdir()) == []


async def test_restore_never_takes_a_disk_format_from_the_request(attack: Any) -> None:
    """A guest can write a qcow2 header naming any host file into its raw disk: never open it as qcow2."""
    vm = attack.vm
    answer = await attack(
        "restore_root_disk", {"instance": vm.name, "rebuild_id": "never-ran", "original_format": "qcow2"}
    )
    assert answer == "accepted"
    assert "type='raw'" in vm.libvirt.connection().lookupByName(vm.name).XMLDesc(0).replace('"', "'")


# --- Glance: a lying record, and a token that must stay home ----------------------------------------


class FakeGlance:
    """A Glance v2 API whose answers a test controls, recording which token each request carried."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.records: dict[str, Any] = {}
        self.tokens: list[tuple[str, str | None]] = []
        self.redirect_file_to: str | None = None
        self.valid_tokens = {TOKEN}
        self.app = web.Application()
        self.app.router.add_get("/v2/images/{id}", self.record)
        self.app.router.add_get("/v2/images/{id}/file", self.file)
        self.port = free_port()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def add(self, data: bytes, **fields: Any) -> str:
        image_id = str(uuid.uuid4())
        (self.directory / image_id).write_bytes(data)
        self.records[image_id] = {
            "id": image_id,
            "status": "active",
            "disk_format": "raw",
            "os_hash_algo": "sha256",
            "os_hash_value": hashlib.sha256(data).hexdigest(),
            "size": len(data),
            "min_disk": 0,
            **fields,
        }
        return image_id

    def _token(self, request: web.Request) -> bool:
        token = request.headers.get("X-Auth-Token")
        self.tokens.append((request.path, token))
        return token in self.valid_tokens

    async def record(self, request: web.Request) -> web.StreamResponse:
        if not self._token(request):
            return web.Response(status=401)
        record = self.records.get(request.match_info["id"])
        if record is None:
            return web.Response(status=404)
        if isinstance(record, bytes):
            return web.Response(body=record, content_type="application/json")
        return web.json_response(record)

    async def file(self, request: web.Request) -> web.StreamResponse:
        if not self._token(request):
            return web.Response(status=401)
        if self.redirect_file_to:
            raise web.HTTPFound(self.redirect_file_to)
        return web.FileResponse(self.directory / request.match_info["id"])


async def _run_glance(directory: Path) -> AsyncIterator[FakeGlance]:
    directory.mkdir()
    server = FakeGlance(directory)
    runner = web.AppRunner(server.app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", server.port).start()
    yield server
    await runner.cleanup()


@pytest.fixture
async def glance(tmp_path: Path) -> AsyncIterator[FakeGlance]:
    async for server in _run_glance(tmp_path / "glance"):
        yield server


@pytest.fixture
async def elsewhere(tmp_path: Path) -> AsyncIterator[FakeGlance]:
    """Another server on another port: the token must never reach it."""
    async for server in _run_glance(tmp_path / "elsewhere"):
        yield server


@pytest.fixture
def endpoint(glance: FakeGlance, tmp_path: Path) -> GlanceEndpoint:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    return GlanceEndpoint(glance.url, token_file, allow_http=True)


def resolve_input(glance_url: str, image_id: str, limit: int | None = None) -> ResolveGlanceImageInput:
    return ResolveGlanceImageInput(glance_url=glance_url, image_id=image_id, max_virtual_size_bytes=limit)


@pytest.mark.parametrize(
    "evil", ["../../../outside-state-dir/cron-job", "/etc/cron.d/x", "ab" * 31 + "/.", "A" * 64 + "\n"]
)
async def test_glance_digest_that_is_a_path_is_refused_and_writes_nothing(
    glance: FakeGlance, endpoint: GlanceEndpoint, tmp_path: Path, evil: str
) -> None:
    image_id = glance.add(b"x" * 4096, os_hash_value=evil)
    with pytest.raises(UnsafeImage, match="malformed sha256 os_hash_value"):
        await env.run(
            GlanceActivities(endpoint, LOOPBACK_POLICY).resolve_glance_image,
            resolve_input(glance.url, image_id),
        )
    assert not (tmp_path / "outside-state-dir").exists()


async def test_glance_min_disk_is_capped_by_the_request(glance: FakeGlance, endpoint: GlanceEndpoint) -> None:
    image_id = glance.add(b"x" * 4096, min_disk=1 << 20)  # a PiB
    with pytest.raises(ImageTooLarge, match="at least 1048576 GiB"):
        await env.run(
            GlanceActivities(endpoint, LOOPBACK_POLICY).resolve_glance_image,
            resolve_input(glance.url, image_id, limit=1 << 40),
        )


async def test_glance_record_is_read_up_to_a_limit(glance: FakeGlance, endpoint: GlanceEndpoint) -> None:
    image_id = str(uuid.uuid4())
    glance.records[image_id] = json.dumps({"status": "active", "pad": "x" * (2 << 20)}).encode()
    with pytest.raises(UnsafeImage, match="over 1048576 bytes"):
        await env.run(
            GlanceActivities(endpoint, LOOPBACK_POLICY).resolve_glance_image,
            resolve_input(glance.url, image_id),
        )


async def test_token_goes_to_the_configured_glance_only(
    glance: FakeGlance, elsewhere: FakeGlance, endpoint: GlanceEndpoint, tmp_path: Path
) -> None:
    data = write_image(tmp_path / "g.raw", "image G").read_bytes()
    image_id = glance.add(data)
    lookalike = elsewhere.add(data)
    activities = ImageActivities(
        StateDir(tmp_path / "state"), glance=endpoint, address_policy=LOOPBACK_POLICY
    )
    # An image URL whose path merely looks like Glance's, on another server.
    with pytest.raises(ImageNotFound):
        await env.run(
            activities.fetch_image,
            FetchImageInput(url=f"{elsewhere.url}/v2/images/{lookalike}/file", max_bytes=GIB),
        )
    # A request naming another Glance.
    with pytest.raises(ImageNotFound):
        await env.run(
            GlanceActivities(endpoint, LOOPBACK_POLICY).resolve_glance_image,
            resolve_input(elsewhere.url, lookalike),
        )
    assert [token for _, token in elsewhere.tokens] == [None, None]
    # The configured one gets it.
    cached = await env.run(
        activities.fetch_image, FetchImageInput(url=f"{glance.url}/v2/images/{image_id}/file", max_bytes=GIB)
    )
    assert cached.sha256 == hashlib.sha256(data).hexdigest()
    assert glance.tokens == [(f"/v2/images/{image_id}/file", TOKEN)]


async def test_token_never_follows_a_redirect(
    glance: FakeGlance, elsewhere: FakeGlance, endpoint: GlanceEndpoint, tmp_path: Path
) -> None:
    data = b"\x01" * 4096
    image_id = glance.add(data)
    elsewhere_id = elsewhere.add(data)
    glance.redirect_file_to = f"{elsewhere.url}/v2/images/{elsewhere_id}/file"
    activities = ImageActivities(
        StateDir(tmp_path / "state"), glance=endpoint, address_policy=LOOPBACK_POLICY
    )
    with pytest.raises(ImageNotFound, match="redirect"):
        await env.run(
            activities.fetch_image,
            FetchImageInput(url=f"{glance.url}/v2/images/{image_id}/file", max_bytes=GIB),
        )
    assert elsewhere.tokens == []


async def test_token_file_is_reread_when_it_changes_and_after_a_401(
    glance: FakeGlance, endpoint: GlanceEndpoint, tmp_path: Path
) -> None:
    image_id = glance.add(b"\x01" * 4096)
    resolver = GlanceActivities(endpoint, LOOPBACK_POLICY)
    await env.run(resolver.resolve_glance_image, resolve_input(glance.url, image_id))
    glance.valid_tokens = {"renewed"}
    (tmp_path / "token").write_text("renewed")
    await env.run(resolver.resolve_glance_image, resolve_input(glance.url, image_id))
    assert [token for _, token in glance.tokens] == [TOKEN, "renewed"]


def test_a_plain_http_glance_needs_the_operators_consent(tmp_path: Path) -> None:
    with pytest.raises(GlanceConfigError, match="plain http"):
        GlanceEndpoint("http://glance.example:9292", tmp_path / "token")
    assert (
        GlanceEndpoint("https://glance.example:9292/", tmp_path / "token").url
        == "https://glance.example:9292"
    )


def test_worker_refuses_a_token_without_its_endpoint_and_a_bad_network(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text(TOKEN)
    for args, message in (
        (["--glance-token-file", str(token)], "needs --glance-url"),
        (["--allow-image-network", "not-a-cidr"], "does not appear to be an IPv4 or IPv6 network"),
    ):
        done = subprocess.run(
            [str(BIN / "rebuild-worker"), "--address", "127.0.0.1:1", *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 2, done.stderr
        assert message in done.stderr
        assert "Traceback" not in done.stderr


# --- server-side request forgery ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "why"),
    [
        ("127.0.0.1", "loopback"),
        ("::1", "loopback"),
        ("::ffff:127.0.0.1", "loopback"),
        ("169.254.169.254", "link-local"),
        ("fe80::1", "link-local"),
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("192.168.1.1", "private"),
        ("100.64.0.1", "private"),
        ("fd00:ec2::254", "private"),
        ("0.0.0.0", "unicast"),
        ("224.0.0.1", "unicast"),
    ],
)
def test_policy_refuses_internal_addresses(address: str, why: str) -> None:
    refusal = AddressPolicy().refusal(address)
    assert refusal is not None and why in refusal


def test_policy_allows_public_addresses_and_what_the_operator_allowed() -> None:
    assert AddressPolicy().refusal("8.8.8.8") is None
    assert AddressPolicy().refusal("2a00:1450:4001::1") is None
    allowed = AddressPolicy(parse_networks(["10.0.5.0/24"]))
    assert allowed.refusal("10.0.5.7") is None
    assert allowed.refusal("10.0.6.7") is not None


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:{port}/image-B.raw",
        "http://localhost:{port}/image-B.raw",
        "http://[::1]:{port}/image-B.raw",
        "http://169.254.169.254/latest/meta-data/iam/security-credentials/",
        "http://10.255.255.1/internal",
    ],
)
async def test_fetch_refuses_internal_addresses_before_connecting(
    images: ImageServer, tmp_path: Path, url: str
) -> None:
    serve(images, "image B", "raw")
    activities = ImageActivities(StateDir(tmp_path / "state"))  # the default policy
    with pytest.raises(ImageSourceRefused, match="--allow-image-network") as refused:
        await env.run(
            activities.fetch_image, FetchImageInput(url=url.format(port=images.port), max_bytes=GIB)
        )
    assert refused.value.non_retryable
    # Refused after resolving (localhost) and before any packet: the server saw nothing, and the
    # unroutable addresses did not time out trying.
    assert images.requests == []


async def test_every_redirect_is_checked(images: ImageServer, tmp_path: Path) -> None:
    """An allowed server redirects to a refused address: the redirect is never followed."""
    served = images.directory / "inner.raw"
    served.write_bytes(b"\x01" * 4096)
    inner = ImageServer(images.directory)
    inner.port = free_port()
    runner = web.AppRunner(inner.app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.2", inner.port).start()
    outer = web.Application()

    async def redirect(_: web.Request) -> web.StreamResponse:
        raise web.HTTPFound(f"http://127.0.0.2:{inner.port}/inner.raw")

    outer.router.add_get("/image", redirect)
    outer_runner = web.AppRunner(outer)
    await outer_runner.setup()
    outer_port = free_port()
    await web.TCPSite(outer_runner, "127.0.0.1", outer_port).start()
    try:
        only_one = AddressPolicy(parse_networks(["127.0.0.1/32"]))
        activities = ImageActivities(StateDir(tmp_path / "state"), address_policy=only_one)
        with pytest.raises(ImageSourceRefused, match=r"127\.0\.0\.2"):
            await env.run(
                activities.fetch_image,
                FetchImageInput(url=f"http://127.0.0.1:{outer_port}/image", max_bytes=GIB),
            )
        assert inner.requests == []
    finally:
        await outer_runner.cleanup()
        await runner.cleanup()


# --- images with nothing in them, and images that are two things at once ---------------------------


def cached(state: StateDir, data: bytes | Path) -> str:
    state.create()
    raw = data.read_bytes() if isinstance(data, Path) else data
    sha = hashlib.sha256(raw).hexdigest()
    state.image_path(sha).write_bytes(raw)
    return sha


async def check(state: StateDir, sha: str) -> None:
    await env.run(
        ImageActivities(state, address_policy=LOOPBACK_POLICY).check_image,
        CheckImageInput(sha256=sha, max_virtual_size_bytes=1 << 40),
    )


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda d: b"", id="zero-bytes"),
        pytest.param(lambda d: b"\x00" * (4 << 20), id="raw-all-zero"),
        pytest.param(lambda d: qcow2(d, "1G"), id="qcow2-without-data"),
    ],
)
async def test_empty_images_are_refused_before_anything_changes(tmp_path: Path, make: Any) -> None:
    state = StateDir(tmp_path / "state")
    sha = cached(state, make(tmp_path))
    with pytest.raises(EmptyImage, match=r"nothing to boot|only zeros"):
        await check(state, sha)
    assert not state.image_path(sha).exists()


async def test_a_filesystem_without_a_boot_sector_is_not_empty(tmp_path: Path) -> None:
    image = tmp_path / "fs.raw"
    with open(image, "wb") as out:
        out.truncate(8 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True)
    state = StateDir(tmp_path / "state")
    await check(state, cached(state, image))


def qcow2(directory: Path, size: str) -> Path:
    path = directory / f"empty-{size}.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), size], check=True)
    return path


def polyglot(directory: Path, offset: int, signature: bytes) -> bytes:
    base = bytearray(write_image(directory / "base.qcow2", "POLY", fmt="qcow2").read_bytes())
    base[offset : offset + len(signature)] = signature
    return bytes(base)


@pytest.mark.parametrize(
    ("offset", "signature", "second"),
    [(0x8001, b"CD001", "iso"), (0x9001, b"CD001", "iso"), (512, b"EFI PART", "gpt")],
)
async def test_polyglot_images_are_refused(
    tmp_path: Path, offset: int, signature: bytes, second: str
) -> None:
    state = StateDir(tmp_path / "state")
    sha = cached(state, polyglot(tmp_path, offset, signature))
    with pytest.raises(UnsafeImage, match=f"at once qcow2 and {second}"):
        await check(state, sha)


async def test_iso_is_refused_and_a_raw_disk_with_gpt_is_accepted(tmp_path: Path) -> None:
    iso = bytearray(64 << 10)
    iso[0x8001:0x8006] = b"CD001"
    state = StateDir(tmp_path / "state")
    with pytest.raises(UnsafeImage, match="format iso is not accepted"):
        await check(state, cached(state, bytes(iso)))
    disk = bytearray(write_image(tmp_path / "gpt.raw", "GPT").read_bytes())
    disk[512:520] = b"EFI PART"
    assert image_format.inspect_header(_write(tmp_path / "gpt2.raw", bytes(disk))) == "raw"


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


async def test_qemu_img_runs_under_its_address_space_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    image = write_image(tmp_path / "ok.qcow2", "OK", fmt="qcow2")
    assert (await qemu_img.image_info(str(image), "qcow2"))["format"] == "qcow2"
    # The same call with a limit too small for qemu-img to even load: the limit is really applied.
    monkeypatch.setattr(qemu_img, "ADDRESS_SPACE_LIMIT", 8 << 20)
    with pytest.raises(DiskToolFailed):
        await qemu_img.image_info(str(image), "qcow2")


# --- workflow IDs, and bounded words at the edges ---------------------------------------------------


def test_workflow_ids_of_different_instances_never_collide() -> None:
    assert rebuild_workflow_id("kvm", "1-web") != rebuild_workflow_id("kvm-1", "web")
    # The old form did collide; it is kept only to find old rebuilds.
    assert legacy_rebuild_workflow_id("kvm", "1-web") == legacy_rebuild_workflow_id("kvm-1", "web")


async def test_rebuilds_under_the_legacy_id_are_found_and_still_lock_the_instance(
    dev_server: DevServer, client: Client, unique_host: str, fake_host: FakeHost
) -> None:
    request = RebuildRequest(
        instance="vm-old", host=unique_host, image_url="http://images.example/b.raw", require_approval=True
    )
    await client.start_workflow(
        "RebuildInstance",
        request,
        id=legacy_rebuild_workflow_id(unique_host, "vm-old"),
        task_queue=WORKFLOW_TASK_QUEUE,
    )
    status = await rebuild_cli(dev_server.address, "status", "vm-old", "--host", unique_host, "--json")
    assert status.code == 0, status.stderr
    assert status.json()["workflow_id"] == legacy_rebuild_workflow_id(unique_host, "vm-old")
    again = await rebuild_cli(
        dev_server.address, "start", "vm-old", "--host", unique_host, "--image", "http://images.example/c.raw"
    )
    assert again.code == 2
    assert "already running" in again.stderr
    aborted = await rebuild_cli(
        dev_server.address, "abort", "vm-old", "--host", unique_host, "--reason", "done"
    )
    assert aborted.code == 0, aborted.stderr


async def test_requested_by_is_bounded_at_the_edge(dev_server: DevServer, unique_host: str) -> None:
    result = await rebuild_cli(
        dev_server.address,
        *("start", "vm-1", "--host", unique_host, "--image", "http://images.example/b.raw"),
        *("--requested-by", "x" * 10_000),
    )
    assert result.code == 2
    assert "requested_by must have 1 to 200 characters" in result.stderr
    assert "Traceback" not in result.stderr
