"""Images named by a Glance v2 image ID: read the record, and where its bytes are.

Only the part of the Image API a rebuild needs: ``GET /v2/images/{id}`` for ``disk_format``,
``os_hash_algo``/``os_hash_value``, ``size`` and ``min_disk``; the bytes come from
``/v2/images/{id}/file`` through the ordinary fetch.

A Glance record is untrusted input like the image itself: its digest becomes a file name in the cache
only after it was checked as a digest, its numbers are bounded, and its body is read up to a limit.
The worker's token belongs to the one Glance endpoint its operator configured: it is sent there only
(scheme, host and port compared), never along a redirect, never into a workflow history.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from temporalio import activity

from activities.errors import ImageDownloadError, ImageNotFound, ImageTooLarge, InvalidRequest, UnsafeImage
from activities.network import AddressPolicy, GuardedConnector
from workflows.models import ResolvedImage, ResolveGlanceImageInput

GIB = 1 << 30
ACCEPTED_DISK_FORMATS = ("raw", "qcow2")
# A Glance image record is a few KiB; a server that sends more is not a Glance we want to parse.
MAX_RECORD_BYTES = 1 << 20
_DIGEST = {"sha256": re.compile(r"[0-9a-f]{64}"), "sha512": re.compile(r"[0-9a-f]{128}")}
IMAGE_ID = re.compile(r"[0-9a-fA-F-]{32,36}")
_DEFAULT_PORTS = {"http": 80, "https": 443}


def origin(url: str) -> tuple[str, str, int]:
    """Scheme, host and port: what must match before a credential goes to a URL."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    try:
        port = parts.port or _DEFAULT_PORTS.get(scheme, 0)
    except ValueError:
        port = -1
    return scheme, (parts.hostname or "").lower(), port


class GlanceConfigError(ValueError):
    """The worker's Glance settings are unusable; said once, at worker start."""


@dataclass
class GlanceEndpoint:
    """The Glance endpoint this worker's operator configured, and the token that belongs to it.

    The token file is re-read whenever it changes, so whatever renews the token (a Keystone client
    run from a timer, a secrets agent) is picked up without restarting the worker.
    """

    url: str
    token_file: Path | None = None
    allow_http: bool = False
    _token: str | None = field(default=None, init=False, repr=False)
    _token_mtime: float = field(default=-1.0, init=False, repr=False)

    def __post_init__(self) -> None:
        scheme, host, _ = origin(self.url)
        if scheme not in _DEFAULT_PORTS or not host:
            raise GlanceConfigError(f"Glance endpoint must be an http(s) URL with a host: {self.url!r}")
        if scheme == "http" and not self.allow_http:
            raise GlanceConfigError(
                f"Glance endpoint {self.url} is plain http: its token would cross the network in "
                "clear (--glance-allow-http to accept that)"
            )
        self.url = self.url.rstrip("/")

    def token_for(self, url: str) -> str | None:
        """The token, if ``url`` is on this endpoint; None for every other URL."""
        if self.token_file is None or origin(url) != origin(self.url):
            return None
        mtime = os.stat(self.token_file).st_mtime
        if mtime != self._token_mtime:
            self._token = self.token_file.read_text().strip() or None
            self._token_mtime = mtime
        return self._token

    def forget_token(self) -> None:
        """After a 401: read the file again on next use, even if its time stamp did not change."""
        self._token_mtime = -1.0


class GlanceActivities:
    def __init__(self, endpoint: GlanceEndpoint | None = None, address_policy: AddressPolicy | None = None):
        self.endpoint = endpoint
        self.address_policy = address_policy or AddressPolicy()

    @activity.defn
    async def resolve_glance_image(self, request: ResolveGlanceImageInput) -> ResolvedImage:
        if not IMAGE_ID.fullmatch(request.image_id):
            raise InvalidRequest(f"not a Glance image ID: {request.image_id[:80]!r}")
        if origin(request.glance_url)[0] not in _DEFAULT_PORTS:
            raise InvalidRequest(f"Glance URL must be http(s): {request.glance_url[:200]!r}")
        url = f"{request.glance_url.rstrip('/')}/v2/images/{request.image_id}"
        record = await self._get_record(url, request.image_id)
        return _resolved(record, f"{url}/file", request.image_id, request.max_virtual_size_bytes)

    async def _get_record(self, url: str, image_id: str) -> dict[str, Any]:
        for attempt in (1, 2):
            token = self.endpoint.token_for(url) if self.endpoint else None
            status, body = await self._fetch_record(url, token)
            if status == 401 and token and attempt == 1 and self.endpoint:
                # The token expired: whatever renews it may have written a new one by now.
                self.endpoint.forget_token()
                continue
            break
        if status in (401, 403, 404):
            raise ImageNotFound(f"Glance has no image {image_id} for us ({status})")
        if status != 200:
            raise ImageDownloadError(f"Glance answered {status} for {url}; will retry")
        try:
            record = json.loads(body)
        except ValueError:
            raise UnsafeImage(f"Glance's record for {image_id} is not JSON") from None
        if not isinstance(record, dict):
            raise UnsafeImage(f"Glance's record for {image_id} is not a JSON object")
        return record

    async def _fetch_record(self, url: str, token: str | None) -> tuple[int, bytes]:
        timeout = aiohttp.ClientTimeout(total=60)
        headers = {"X-Auth-Token": token} if token else {}
        try:
            async with (
                aiohttp.ClientSession(
                    connector=GuardedConnector(self.address_policy), timeout=timeout
                ) as session,
                session.get(url, headers=headers, allow_redirects=False) as response,
            ):
                body = bytearray()
                async for chunk in response.content.iter_chunked(64 << 10):
                    body += chunk
                    if len(body) > MAX_RECORD_BYTES:
                        raise UnsafeImage(f"Glance's answer for {url} is over {MAX_RECORD_BYTES} bytes")
                return response.status, bytes(body)
        except (aiohttp.ClientError, TimeoutError) as err:
            raise ImageDownloadError(f"Glance at {url} unreachable: {err}") from None


def _resolved(
    record: dict[str, Any], file_url: str, image_id: str, max_virtual_size: int | None
) -> ResolvedImage:
    if record.get("status") != "active":
        raise ImageNotFound(f"Glance image {image_id} is {str(record.get('status'))[:40]!r}, not active")
    disk_format = record.get("disk_format")
    if disk_format not in ACCEPTED_DISK_FORMATS:
        raise UnsafeImage(
            f"Glance image {image_id} has disk_format {str(disk_format)[:40]!r}; only raw and qcow2"
        )
    algo, value = record.get("os_hash_algo"), record.get("os_hash_value")
    digests: dict[str, str] = {}
    if algo in _DIGEST and value is not None:
        value = str(value).lower()
        if not _DIGEST[algo].fullmatch(value):
            raise UnsafeImage(f"Glance image {image_id} has a malformed {algo} os_hash_value: {value[:80]!r}")
        digests[algo] = value
    min_disk = record.get("min_disk") or 0
    if not isinstance(min_disk, int) or isinstance(min_disk, bool) or min_disk < 0:
        raise UnsafeImage(f"Glance image {image_id} has an invalid min_disk: {str(min_disk)[:40]!r}")
    if max_virtual_size is not None and min_disk * GIB > max_virtual_size:
        raise ImageTooLarge(
            f"Glance image {image_id} asks for a disk of at least {min_disk} GiB, over the limit of "
            f"{max_virtual_size} bytes"
        )
    size = record.get("size")
    return ResolvedImage(
        url=file_url,
        sha256=digests.get("sha256"),
        sha512=digests.get("sha512"),
        disk_format=disk_format,
        size=size if isinstance(size, int) and not isinstance(size, bool) and size >= 0 else None,
        min_disk_bytes=min_disk * GIB,
    )
