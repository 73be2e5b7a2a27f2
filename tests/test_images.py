"""fetch_image against a real aiohttp image server: downloads, resumes, faults and the cache.

Each test serves random bytes from its own directory and fetches them into its own state directory,
running the real activity in an ``ActivityEnvironment``.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import stat
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from temporalio.testing import ActivityEnvironment

from activities.errors import ChecksumMismatch, ImageDownloadError, ImageNotFound, ImageTooLarge
from activities.image_fetch import READ_BUFFER_BYTES
from activities.images import ImageActivities
from activities.state import StateDir
from devtools.image_server import Fault, ImageServer, RequestLog
from devtools.temporal_dev import free_port
from tests.e2e_support import LOOPBACK_POLICY
from workflows.models import CachedImage, FetchImageInput, FetchProgress

MiB = 1 << 20
LIMIT = 64 * MiB


@dataclass(frozen=True)
class Image:
    name: str
    data: bytes

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def size(self) -> int:
        return len(self.data)


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[ImageServer]:
    served = tmp_path / "served"
    served.mkdir()
    image_server = ImageServer(served)
    await image_server.start()
    yield image_server
    await image_server.stop()


@pytest.fixture
def state(tmp_path: Path) -> StateDir:
    return StateDir(tmp_path / "state")


@pytest.fixture
def images(state: StateDir) -> ImageActivities:
    return ImageActivities(state, read_timeout_seconds=10, address_policy=LOOPBACK_POLICY)


def publish(server: ImageServer, name: str, size: int) -> Image:
    data = random.randbytes(size)
    (server.directory / name).write_bytes(data)
    return Image(name, data)


async def fetch(
    images: ImageActivities,
    request: FetchImageInput,
    on_heartbeat: Callable[..., None] | None = None,
) -> CachedImage:
    env = ActivityEnvironment()
    if on_heartbeat is not None:
        env.on_heartbeat = on_heartbeat
    result: CachedImage = await env.run(images.fetch_image, request)
    return result


def request_for(server: ImageServer, image: Image, sha256: str | None = "same") -> FetchImageInput:
    return FetchImageInput(
        url=server.url(image.name),
        sha256=image.sha256 if sha256 == "same" else sha256,
        max_bytes=LIMIT,
    )


def requests_for(server: ImageServer, image: Image) -> list[RequestLog]:
    return [r for r in server.requests if r.path == image.name]


def partial_files(state: StateDir) -> list[Path]:
    return sorted(state.partial.glob("*.part"))


def cached_files(state: StateDir) -> list[Path]:
    return sorted(p for p in state.images.iterdir() if p.is_file())


def assert_cached(state: StateDir, image: Image) -> None:
    path = state.image_path(image.sha256)
    assert path.is_file()
    assert hashlib.sha256(path.read_bytes()).hexdigest() == image.sha256
    assert cached_files(state) == [path]
    assert partial_files(state) == []


def assert_not_cached(state: StateDir, image: Image) -> None:
    assert not state.image_path(image.sha256).exists()
    assert cached_files(state) == []


async def drop_half(server: ImageServer, images: ImageActivities, image: Image) -> int:
    """A first attempt whose connection the server drops half-way; returns the partial's size."""
    server.faults[image.name] = Fault(drop_at_fraction=0.5)
    with pytest.raises(ImageDownloadError) as failure:
        await fetch(images, request_for(server, image))
    assert not failure.value.non_retryable
    assert_not_cached(images.state, image)
    [partial] = partial_files(images.state)
    size = partial.stat().st_size
    assert 0 < size <= image.size // 2
    return size


@pytest.mark.parametrize("sha_given", [True, False], ids=["sha-given", "sha-computed"])
async def test_plain_download_lands_in_cache_under_its_sha(
    server: ImageServer, images: ImageActivities, state: StateDir, sha_given: bool
) -> None:
    image = publish(server, "plain.raw", 4 * MiB + 123)

    cached = await fetch(images, request_for(server, image, "same" if sha_given else None))

    assert cached == CachedImage(
        sha256=image.sha256, size=image.size, downloaded_bytes=image.size, cache_hit=False
    )
    assert_cached(state, image)
    assert [(r.status, r.range_header) for r in requests_for(server, image)] == [(200, None)]


async def test_cache_hit_makes_no_request(
    server: ImageServer, images: ImageActivities, state: StateDir
) -> None:
    image = publish(server, "hit.raw", 2 * MiB)
    await fetch(images, request_for(server, image))
    seen = list(server.requests)

    again = await fetch(images, request_for(server, image))

    assert server.requests == seen
    assert again == CachedImage(sha256=image.sha256, size=image.size, downloaded_bytes=0, cache_hit=True)
    assert_cached(state, image)


async def test_dropped_download_resumes_with_range(
    server: ImageServer, images: ImageActivities, state: StateDir
) -> None:
    # What a drop throws away is bounded by the client's read buffer (images.READ_BUFFER_BYTES, twice
    # that at aiohttp's high-water mark), whatever the image size: 32 MiB makes 5 % a fair test of it.
    image = publish(server, "resume.raw", 32 * MiB)
    kept = await drop_half(server, images, image)

    cached = await fetch(images, request_for(server, image))

    assert cached.sha256 == image.sha256
    assert cached.downloaded_bytes == image.size - kept
    assert_cached(state, image)
    first, second = requests_for(server, image)
    assert first.range_header is None
    assert (second.status, second.range_header) == (206, f"bytes={kept}-")
    assert second.bytes_sent == image.size - kept
    resent = server.bytes_sent(image.name) - image.size
    assert 0 <= resent <= image.size * 0.05
    assert resent <= 2 * READ_BUFFER_BYTES + 64 * 1024


async def test_server_ignoring_range_restarts_from_zero(
    server: ImageServer, images: ImageActivities, state: StateDir
) -> None:
    image = publish(server, "norange.raw", 4 * MiB)
    kept = await drop_half(server, images, image)
    server.faults[image.name] = Fault(ignore_range=True)

    cached = await fetch(images, request_for(server, image))

    assert cached.sha256 == image.sha256
    assert cached.downloaded_bytes == image.size
    assert_cached(state, image)
    second = requests_for(server, image)[1]
    assert (second.status, second.range_header) == (200, f"bytes={kept}-")


async def test_server_error_is_retried(server: ImageServer, images: ImageActivities, state: StateDir) -> None:
    image = publish(server, "flaky.raw", 2 * MiB)
    server.faults[image.name] = Fault(statuses=[500])

    with pytest.raises(ImageDownloadError, match="500") as failure:
        await fetch(images, request_for(server, image))
    assert not failure.value.non_retryable
    assert failure.value.type == "ImageDownloadError"
    assert_not_cached(state, image)

    cached = await fetch(images, request_for(server, image))

    assert cached.sha256 == image.sha256
    assert_cached(state, image)
    assert [r.status for r in requests_for(server, image)] == [500, 200]


async def test_missing_image_is_not_retried(server: ImageServer, images: ImageActivities) -> None:
    with pytest.raises(ImageNotFound, match="404") as failure:
        await fetch(images, FetchImageInput(url=server.url("nowhere.raw"), max_bytes=LIMIT))
    assert failure.value.non_retryable
    assert failure.value.type == "ImageNotFound"


async def test_wrong_sha256_is_refused_and_nothing_kept(
    server: ImageServer, images: ImageActivities, state: StateDir
) -> None:
    image = publish(server, "tampered.raw", 2 * MiB)
    expected = hashlib.sha256(b"the image the operator meant").hexdigest()

    with pytest.raises(ChecksumMismatch, match=expected) as failure:
        await fetch(images, request_for(server, image, expected))

    assert failure.value.non_retryable
    assert partial_files(state) == []
    assert not state.image_path(expected).exists()
    assert_not_cached(state, image)


async def test_body_cut_short_is_a_retryable_error(
    server: ImageServer, images: ImageActivities, state: StateDir
) -> None:
    image = publish(server, "short.raw", 4 * MiB)
    server.faults[image.name] = Fault(truncate_at_fraction=0.7)

    with pytest.raises(ImageDownloadError) as failure:
        await fetch(images, request_for(server, image, None))

    assert not failure.value.non_retryable
    assert_not_cached(state, image)
    assert [r.bytes_sent for r in requests_for(server, image)] == [int(image.size * 0.7)]


async def test_image_over_max_bytes_is_refused(
    server: ImageServer, images: ImageActivities, state: StateDir
) -> None:
    image = publish(server, "big.raw", 4 * MiB)

    with pytest.raises(ImageTooLarge, match="over the limit") as failure:
        await fetch(images, FetchImageInput(url=server.url(image.name), max_bytes=3 * MiB))

    assert failure.value.non_retryable
    assert_not_cached(state, image)
    assert partial_files(state) == []


async def test_heartbeats_report_growing_offset(
    server: ImageServer, images: ImageActivities, state: StateDir
) -> None:
    image = publish(server, "slow.raw", 2 * MiB)
    # 32 chunks of 64 KiB at 50 ms each: about 1.6 s, so the once-a-second heartbeat fires mid-body.
    server.faults[image.name] = Fault(seconds_per_chunk=0.05)
    beats: list[Any] = []

    await fetch(images, request_for(server, image), on_heartbeat=lambda *details: beats.extend(details))

    progress = [beat for beat in beats if isinstance(beat, FetchProgress)]
    assert progress == beats
    offsets = [p.offset for p in progress]
    assert offsets == sorted(offsets)
    assert offsets[-1] == image.size
    assert any(0 < offset < image.size for offset in offsets)
    assert len(set(offsets)) >= 3
    assert all(p.total == image.size for p in progress if p.offset)
    assert_cached(state, image)


async def test_concurrent_fetches_download_once(
    server: ImageServer, images: ImageActivities, state: StateDir
) -> None:
    image = publish(server, "popular.raw", 8 * MiB)

    results = await asyncio.gather(
        fetch(images, request_for(server, image)), fetch(images, request_for(server, image))
    )

    assert {r.sha256 for r in results} == {image.sha256}
    assert sorted(r.cache_hit for r in results) == [False, True]
    downloads = [r for r in requests_for(server, image) if r.status in (200, 206)]
    assert len(downloads) == 1
    assert server.bytes_sent(image.name) == image.size
    assert_cached(state, image)


async def test_complete_partial_is_finished_without_body(
    server: ImageServer, images: ImageActivities, state: StateDir
) -> None:
    """A crash after the last byte but before the rename: the server answers 416, the hash decides."""
    image = publish(server, "complete.raw", 2 * MiB)
    state.create()
    (state.partial / f"{image.sha256}.part").write_bytes(image.data)

    cached = await fetch(images, request_for(server, image))

    assert (cached.sha256, cached.downloaded_bytes) == (image.sha256, 0)
    assert_cached(state, image)
    assert [(r.status, r.bytes_sent) for r in requests_for(server, image)] == [(416, 0)]


async def test_partial_longer_than_image_starts_again(
    server: ImageServer, images: ImageActivities, state: StateDir
) -> None:
    """The image changed on the server to a shorter one: the partial is thrown away, not trusted."""
    image = publish(server, "shrunk.raw", 2 * MiB)
    state.create()
    (state.partial / f"{image.sha256}.part").write_bytes(image.data + b"stale tail")

    with pytest.raises(ImageDownloadError, match="starting again") as failure:
        await fetch(images, request_for(server, image))
    assert not failure.value.non_retryable
    assert partial_files(state) == []

    cached = await fetch(images, request_for(server, image))

    assert cached.downloaded_bytes == image.size
    assert_cached(state, image)


async def test_unreachable_server_is_a_retryable_error(images: ImageActivities, state: StateDir) -> None:
    url = f"http://127.0.0.1:{free_port()}/image.raw"

    with pytest.raises(ImageDownloadError, match="interrupted after 0 bytes") as failure:
        await fetch(images, FetchImageInput(url=url, max_bytes=LIMIT))

    assert not failure.value.non_retryable
    assert partial_files(state) == []


@pytest.fixture
async def chunked_url(tmp_path: Path) -> AsyncIterator[Callable[[bytes], str]]:
    """A server that streams bodies without Content-Length, so only the bytes themselves show the size."""
    bodies: dict[str, bytes] = {}

    async def serve(request: web.Request) -> web.StreamResponse:
        body = bodies[request.match_info["name"]]
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        for start in range(0, len(body), 64 * 1024):
            await response.write(body[start : start + 64 * 1024])
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_get("/{name}", serve)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()

    def publish_chunked(data: bytes) -> str:
        name = f"chunked-{len(bodies)}.raw"
        bodies[name] = data
        return f"http://127.0.0.1:{port}/{name}"

    yield publish_chunked
    await runner.cleanup()


async def test_unannounced_size_is_limited_while_streaming(
    chunked_url: Callable[[bytes], str], images: ImageActivities, state: StateDir
) -> None:
    small = random.randbytes(1 * MiB)
    cached = await fetch(images, FetchImageInput(url=chunked_url(small), max_bytes=3 * MiB))
    assert (cached.sha256, cached.size) == (hashlib.sha256(small).hexdigest(), len(small))

    large = random.randbytes(6 * MiB)
    with pytest.raises(ImageTooLarge, match="larger than the limit") as failure:
        await fetch(images, FetchImageInput(url=chunked_url(large), max_bytes=3 * MiB))

    assert failure.value.non_retryable
    assert partial_files(state) == []
    assert cached_files(state) == [state.image_path(cached.sha256)]


async def test_cache_is_reachable_by_qemu_and_read_only_whatever_the_umask(
    server: ImageServer, tmp_path: Path
) -> None:
    """QEMU opens cached images as its own unprivileged user: it must traverse to them, never write."""
    old_umask = os.umask(0o077)
    try:
        state = StateDir(tmp_path / "tight-state")
        images = ImageActivities(state, address_policy=LOOPBACK_POLICY)
        image = publish(server, "tight.raw", MiB)
        await fetch(images, request_for(server, image))
    finally:
        os.umask(old_umask)
    for directory in (state.root, state.images):
        assert directory.stat().st_mode & 0o001, f"{directory} is not traversable by others"
    assert stat.S_IMODE(state.partial.stat().st_mode) == 0o700
    assert stat.S_IMODE(state.image_path(image.sha256).stat().st_mode) == 0o444
