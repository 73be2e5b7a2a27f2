"""Image transport: download (or copy from the worker's image directory) into the host cache.

The cache holds each image once, under its SHA-256, and a file appears there only by an atomic rename
after its digest was computed (and matched, when the request named one). Downloads resume from the
partial file's real size; heartbeat details are only progress to show, since they lag after a crash.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import hashlib
import os
import re
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

import aiohttp
from temporalio import activity

from activities.checkpoints import Checkpoints
from activities.digests import Digests
from activities.errors import (
    CacheQuotaExceeded,
    ChecksumMismatch,
    HostOutOfSpace,
    ImageDownloadError,
    ImageNotFound,
    ImageTooLarge,
    InvalidRequest,
)
from activities.glance import GlanceEndpoint
from activities.heartbeat import keep_alive
from activities.network import AddressPolicy, GuardedConnector
from activities.sink import BATCH_BYTES, PipelinedSink
from activities.state import StateDir, fsync_dir, require_digest, write_atomically
from workflows import metrics
from workflows.models import CachedImage, FetchImageInput, FetchProgress
from workflows.names import host_of_queue

CHUNK_BYTES = 1 << 20
# aiohttp pauses the socket when its buffer holds twice this, and resumes it once read: at 256 KiB
# that churn ran on the event loop's thread, which bounds the fetch; at 1 MiB, with chunks handed on
# in 1 MiB batches, the fetch went from 0.76x to 0.86-1.03x curl -o (bench/download.py's nginx, runs
# alternated, 2026-12-03). The price: on a dropped connection aiohttp raises before handing over what
# it still buffers (up to twice this, 2 MiB), and those bytes are fetched again.
READ_BUFFER_BYTES = 1 << 20
HEARTBEAT_EVERY_SECONDS = 1.0
T = TypeVar("T")
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")
MAX_URL_LENGTH = 4096
# Redirects an image server may send (each hop is checked against the address policy).
MAX_REDIRECTS = 5
_UNSATISFIED_RANGE = re.compile(r"^bytes \*/(\d+)$")
# The worker's own limits, whatever a request says (rebuild-worker --max-image-gib, --cache-quota-gib):
# a request's max_bytes is only ever lowered by them.
DEFAULT_MAX_IMAGE_BYTES = 256 << 30
DEFAULT_CACHE_QUOTA_BYTES = 1 << 40


class ImageFetch:
    def __init__(
        self,
        state: StateDir,
        checkpoints: Checkpoints | None = None,
        read_timeout_seconds: float = 60.0,
        file_image_dir: Path | None = None,
        glance: GlanceEndpoint | None = None,
        address_policy: AddressPolicy | None = None,
        max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
        cache_quota_bytes: int | None = DEFAULT_CACHE_QUOTA_BYTES,
    ) -> None:
        self.state = state
        # Anyone who reaches Temporal names max_bytes: the worker's cap bounds it, and the cache's
        # quota bounds all images together (None: only the file system's free space does).
        self.max_image_bytes = max_image_bytes
        self.cache_quota_bytes = cache_quota_bytes
        self.checkpoints = checkpoints or Checkpoints()
        # No total timeout: a large image over a slow link is fine as long as bytes keep coming.
        self.timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=read_timeout_seconds)
        self.file_image_dir = file_image_dir.resolve() if file_image_dir else None
        self.glance = glance
        # Default: public addresses only. Loopback, link-local, metadata and private networks are
        # reachable only where the worker's operator allowed them.
        self.address_policy = address_policy or AddressPolicy()

    def _known(self, request: FetchImageInput) -> Path | None:
        """The cached image the request's digests name, if it is already here."""
        if request.sha256:
            path = self.state.image_path(request.sha256)
            return path if path.exists() else None
        if request.sha512:
            index = self.state.sha512_index(request.sha512)
            if index.exists():
                path = self.state.image_path(index.read_text().strip())
                return path if path.exists() else None
        return None

    async def fetch(self, request: FetchImageInput) -> CachedImage:
        _validate_fetch(request)
        if request.max_bytes > self.max_image_bytes:
            request = request.model_copy(update={"max_bytes": self.max_image_bytes})
        self.state.create()
        if known := self._known(request):
            return _cache_hit(known)
        # Before any byte moves: a full cache takes nothing more.
        self._require_quota(1, request.url)
        key = request.sha256 or request.sha512 or hashlib.sha256(request.url.encode()).hexdigest()
        key = require_digest(key)
        waiting_since = time.time()
        async with _exclusive(self.state.partial_path(key, ".lock")):
            # Whoever held the lock before us may have finished the same image.
            if known := self._known(request) or _fetched_since(self.state, key, waiting_since):
                return _cache_hit(known)
            if urlsplit(request.url).scheme == "file":
                cached = await self._copy_local(request, self.state.partial_path(key, ".part"))
            else:
                cached = await self._download(request, self.state.partial_path(key, ".part"))
            if request.sha512:
                write_atomically(self.state.sha512_index(request.sha512), cached.sha256)
            write_atomically(self.state.partial_path(key, ".done"), cached.sha256)
            return cached

    def _quota_room(self) -> int | None:
        """How many more bytes the cache's quota takes now; None without a quota."""
        if self.cache_quota_bytes is None:
            return None
        return max(0, self.cache_quota_bytes - cache_usage(self.state))

    def _require_quota(self, needed: int, url: str) -> None:
        room = self._quota_room()
        if room is not None and needed > room:
            raise self._over_quota(url, needed)

    def _over_quota(self, url: str, needed: int) -> CacheQuotaExceeded:
        assert self.cache_quota_bytes is not None
        return CacheQuotaExceeded(
            f"the image at {url} needs {needed} more bytes in this host's image cache, which holds "
            f"{cache_usage(self.state)} of its quota of {self.cache_quota_bytes} bytes "
            "(rebuild-worker --cache-quota-gib); free some with `rebuild cache prune`"
        )

    async def _download(self, request: FetchImageInput, partial: Path) -> CachedImage:
        offset = partial.stat().st_size if partial.exists() else 0
        digests = Digests(want_sha512=request.sha512 is not None)
        # Hashing a partial of many GiB takes longer than the heartbeat timeout: beat while it runs.
        async with keep_alive(FetchProgress(offset=offset)):
            await asyncio.to_thread(digests.hash_file_prefix, partial, offset)
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        token = self.glance.token_for(request.url) if self.glance else None
        if token:
            headers["X-Auth-Token"] = token
        received = 0
        try:
            async with (
                aiohttp.ClientSession(
                    connector=GuardedConnector(self.address_policy),
                    timeout=self.timeout,
                    read_bufsize=READ_BUFFER_BYTES,
                ) as session,
                session.get(
                    request.url,
                    headers=headers,
                    # A token never follows a redirect: it belongs to the Glance endpoint alone.
                    allow_redirects=token is None,
                    max_redirects=MAX_REDIRECTS,
                ) as response,
            ):
                if token and 300 <= response.status < 400:
                    raise ImageNotFound(
                        f"Glance answered {response.status} (a redirect) for {request.url}; "
                        "its token is never sent anywhere else"
                    )
                start, total = _resume_point(response, offset, request.url)
                if response.status == 416 and total != offset:
                    # Our partial is longer than the image (it changed on the server): start again.
                    partial.unlink(missing_ok=True)
                    raise ImageDownloadError(
                        f"partial download of {request.url} holds {offset} bytes, the image has {total}; "
                        "starting again"
                    )
                if start == 0 and offset:
                    # The server ignored our Range: start again from the first byte.
                    digests = Digests(want_sha512=request.sha512 is not None)
                    offset = 0
                    os.truncate(partial, 0)
                if total is not None and total > request.max_bytes:
                    partial.unlink(missing_ok=True)
                    raise ImageTooLarge(
                        f"image at {request.url} is {total} bytes, over the limit of {request.max_bytes}"
                        f"{_limit_words(self.max_image_bytes, request.max_bytes)}"
                    )
                if total is not None:
                    self._require_quota(total - offset, request.url)
                    _require_space(partial.parent, total - offset)
                if response.status != 416:
                    room = self._quota_room()
                    received = await self._stream(response, partial, digests, offset, total, request, room)
        except aiohttp.TooManyRedirects:
            raise ImageNotFound(f"{request.url} redirects more than {MAX_REDIRECTS} times") from None
        except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, TimeoutError) as err:
            # A refused connection fails before the partial file exists.
            kept = partial.stat().st_size if partial.exists() else 0
            raise ImageDownloadError(
                f"download of {request.url} interrupted after {kept} bytes: {type(err).__name__}: {err}"
            ) from None
        size = partial.stat().st_size
        if total is not None and size != total:
            raise ImageDownloadError(
                f"download of {request.url} ended at {size} of {total} bytes; will resume"
            )
        activity.metric_meter().create_counter(
            metrics.DOWNLOAD_BYTES, "Bytes of images downloaded", "By"
        ).add(received, {"host": host_of_queue(activity.info().task_queue)})
        return await self._admit(request, partial, digests, size, received)

    async def _admit(
        self, request: FetchImageInput, partial: Path, digests: Digests, size: int, received: int
    ) -> CachedImage:
        """The partial file becomes a cached image, by one rename, once its digests matched."""
        try:
            sha256 = digests.verify(request.url, request.sha256, request.sha512)
        except ChecksumMismatch:
            partial.unlink(missing_ok=True)
            raise
        target = self.state.image_path(sha256)
        # Cached images never change: read-only for everyone, QEMU's user included, which may read
        # them as backing files without libvirt relabelling them.
        os.chmod(partial, 0o444)
        os.replace(partial, target)
        await asyncio.to_thread(fsync_dir, target.parent)
        return CachedImage(sha256=sha256, size=size, downloaded_bytes=received, cache_hit=False)

    async def _copy_local(self, request: FetchImageInput, partial: Path) -> CachedImage:
        """A file:// image, only from inside the worker's configured image directory."""
        source = Path(urlsplit(request.url).path).resolve()
        if self.file_image_dir is None:
            raise InvalidRequest("file:// images are not enabled on this worker (--file-image-dir)")
        if not source.is_relative_to(self.file_image_dir):
            raise InvalidRequest(f"{source} is outside the worker's image directory {self.file_image_dir}")
        if not source.is_file():
            raise ImageNotFound(f"no image file at {source}")
        size = source.stat().st_size
        if size > request.max_bytes:
            raise ImageTooLarge(
                f"image {source} is {size} bytes, over the limit of {request.max_bytes}"
                f"{_limit_words(self.max_image_bytes, request.max_bytes)}"
            )
        self._require_quota(size, request.url)
        _require_space(partial.parent, size)
        digests = Digests(want_sha512=request.sha512 is not None)
        async with keep_alive(FetchProgress(offset=0, total=size)):
            await asyncio.to_thread(_copy_hashing, source, partial, digests)
        return await self._admit(request, partial, digests, size, size)

    async def _stream(
        self,
        response: aiohttp.ClientResponse,
        partial: Path,
        digests: Digests,
        offset: int,
        total: int | None,
        request: FetchImageInput,
        room: int | None,
    ) -> int:
        """The body into the partial file; ``room``: how many bytes the cache's quota still takes."""
        received = 0
        last_beat = 0.0
        halfway_seen = False
        # Chunks gathered for one hand-off to the sink: the per-chunk work on the event loop's thread
        # is an append and an addition; limits, heartbeats and the kill point are checked per batch.
        batch: list[bytes] = []
        batched = 0
        with open(partial, "ab") as out:
            sink = PipelinedSink(out, digests)

            async def hand_over() -> None:
                nonlocal batch, batched, received, last_beat, halfway_seen
                if not batch:
                    return
                await sink.put(batch)
                received += batched
                batch, batched = [], 0
                position = offset + received
                if position > request.max_bytes:
                    await sink.close()
                    partial.unlink(missing_ok=True)
                    raise ImageTooLarge(
                        f"image at {request.url} is larger than the limit of {request.max_bytes}"
                        f"{_limit_words(self.max_image_bytes, request.max_bytes)}"
                    )
                if room is not None and received > room:
                    # A server that did not say the size: the quota is checked as bytes come.
                    await sink.close()
                    partial.unlink(missing_ok=True)
                    raise self._over_quota(request.url, received)
                now = time.monotonic()
                if now - last_beat >= HEARTBEAT_EVERY_SECONDS:
                    activity.heartbeat(FetchProgress(offset=position, total=total))
                    last_beat = now
                if not halfway_seen and total and position * 2 >= total:
                    halfway_seen = True
                    await sink.drain()
                    out.flush()
                    await self.checkpoints.reach("fetch.halfway")

            try:
                try:
                    async for chunk in response.content.iter_any():
                        batch.append(chunk)
                        batched += len(chunk)
                        if batched >= BATCH_BYTES:
                            await hand_over()
                except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, TimeoutError):
                    # What arrived before the drop is kept: the next attempt resumes after it.
                    await hand_over()
                    raise
                await hand_over()
                await sink.drain()
            except OSError as err:
                if err.errno == errno.ENOSPC:
                    await sink.close()
                    partial.unlink(missing_ok=True)
                    raise HostOutOfSpace(
                        f"host ran out of space in {partial.parent} while downloading"
                    ) from None
                raise
            finally:
                await sink.close()
                with contextlib.suppress(OSError):
                    out.flush()
                    os.fsync(out.fileno())
        activity.heartbeat(FetchProgress(offset=offset + received, total=total))
        return received


def _limit_words(cap: int, limit: int) -> str:
    return " bytes (this worker's --max-image-gib)" if limit == cap else " bytes (the request's max_bytes)"


def cache_usage(state: StateDir) -> int:
    """Bytes the image cache holds: cached images and partial downloads (their apparent sizes)."""
    used = 0
    for directory, suffix in ((state.images, ""), (state.partial, ".part")):
        with contextlib.suppress(FileNotFoundError), os.scandir(directory) as entries:
            for entry in entries:
                with contextlib.suppress(FileNotFoundError):
                    if entry.name.endswith(suffix) and entry.is_file(follow_symlinks=False):
                        used += entry.stat(follow_symlinks=False).st_size
    return used


def _validate_fetch(request: FetchImageInput) -> None:
    """Anyone who reaches Temporal can call this activity: it checks its own input."""
    parts = urlsplit(request.url)
    if len(request.url) > MAX_URL_LENGTH or parts.scheme not in ("http", "https", "file"):
        raise InvalidRequest(f"image URL must be http://, https:// or file:///: {request.url[:200]!r}")
    if parts.scheme != "file" and not parts.hostname:
        raise InvalidRequest(f"image URL has no host: {request.url[:200]!r}")
    if request.max_bytes <= 0:
        raise InvalidRequest(f"max_bytes must be positive, not {request.max_bytes}")
    for digest in (request.sha256, request.sha512):
        if digest is not None:
            require_digest(digest)


def _cache_hit(path: Path) -> CachedImage:
    os.utime(path)  # the cache's "last used"
    return CachedImage(sha256=path.name, size=path.stat().st_size, downloaded_bytes=0, cache_hit=True)


def _copy_hashing(source: Path, target: Path, digests: Digests) -> None:
    with open(source, "rb") as src, open(target, "wb") as out:
        try:
            while block := src.read(CHUNK_BYTES):
                out.write(block)
                digests.update(block)
            out.flush()
            os.fsync(out.fileno())
        except OSError as err:
            if err.errno == errno.ENOSPC:
                target.unlink(missing_ok=True)
                raise HostOutOfSpace(f"host ran out of space in {target.parent} while copying") from None
            raise


def _fetched_since(state: StateDir, key: str, since: float) -> Path | None:
    """An image another fetch of the same source finished while we waited for the lock.

    Only for sources named by URL alone: without a digest, "the same image" means "fetched just now".
    """
    record = state.partial_path(key, ".done")
    try:
        if record.stat().st_mtime < since:
            return None
        path = state.image_path(record.read_text().strip())
    except (FileNotFoundError, InvalidRequest):
        return None
    return path if path.exists() else None


def _resume_point(response: aiohttp.ClientResponse, offset: int, url: str) -> tuple[int, int | None]:
    """Where the body starts and the image's total size, from the status and headers."""
    status = response.status
    if status == 416 and offset:
        # Our partial file already holds every byte (the hash decides whether they are right), unless
        # the server says the image has another size.
        match = _UNSATISFIED_RANGE.fullmatch(response.headers.get("Content-Range", ""))
        return offset, int(match.group(1)) if match else offset
    if status in (404, 410):
        raise ImageNotFound(f"image server answered {status} for {url}")
    if status >= 500 or status in (408, 429):
        raise ImageDownloadError(f"image server answered {status} for {url}; will retry")
    if status == 200:
        length = response.content_length
        return 0, length
    if status == 206:
        match = _CONTENT_RANGE.fullmatch(response.headers.get("Content-Range", ""))
        if not match or int(match.group(1)) != offset:
            raise ImageDownloadError(
                f"image server sent range {response.headers.get('Content-Range')!r}, "
                f"asked for bytes {offset}-; will retry"
            )
        total = None if match.group(3) == "*" else int(match.group(3))
        return offset, total
    raise ImageNotFound(f"image server answered {status} {response.reason} for {url}")


def _require_space(directory: Path, needed: int) -> None:
    free = shutil.disk_usage(directory).free
    if needed > free:
        raise HostOutOfSpace(
            f"host out of space: the image needs {needed} more bytes in {directory}, only {free} are free"
        )


@contextlib.asynccontextmanager
async def _exclusive(lock_path: Path) -> AsyncIterator[None]:
    """One download per image per host, across activities and worker restarts.

    The lock is an flock: the kernel drops it when its holder dies, so a killed worker never leaves
    a stale lock behind. Waiting heartbeats, or the heartbeat timeout would kill the waiter.
    """
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                activity.heartbeat("waiting for another download of this image")
                await asyncio.sleep(0.5)
        yield
    finally:
        os.close(fd)
