"""Images named by a Glance v2 image ID: read the record, and where its bytes are.

Only the part of the Image API a rebuild needs: ``GET /v2/images/{id}`` for ``disk_format``,
``os_hash_algo``/``os_hash_value``, ``size`` and ``min_disk``; the bytes come from
``/v2/images/{id}/file`` through the ordinary fetch. A token, when the worker has one, stays on the
worker: it never enters a workflow history.
"""

from __future__ import annotations

from typing import Any

import aiohttp
from temporalio import activity

from activities.errors import ImageDownloadError, ImageNotFound, UnsafeImage
from workflows.models import ResolvedImage, ResolveGlanceImageInput

GIB = 1 << 30
ACCEPTED_DISK_FORMATS = ("raw", "qcow2")


class GlanceActivities:
    def __init__(self, token: str | None = None) -> None:
        self.token = token

    def headers(self) -> dict[str, str]:
        return {"X-Auth-Token": self.token} if self.token else {}

    @activity.defn
    async def resolve_glance_image(self, request: ResolveGlanceImageInput) -> ResolvedImage:
        url = f"{request.glance_url}/v2/images/{request.image_id}"
        timeout = aiohttp.ClientTimeout(total=60)
        try:
            async with (
                aiohttp.ClientSession(timeout=timeout) as session,
                session.get(url, headers=self.headers()) as response,
            ):
                if response.status in (403, 404):
                    raise ImageNotFound(f"Glance has no image {request.image_id} ({response.status})")
                if response.status != 200:
                    raise ImageDownloadError(f"Glance answered {response.status} for {url}; will retry")
                record: dict[str, Any] = await response.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError) as err:
            raise ImageDownloadError(f"Glance at {request.glance_url} unreachable: {err}") from None
        return _resolved(record, f"{url}/file", request.image_id)


def _resolved(record: dict[str, Any], file_url: str, image_id: str) -> ResolvedImage:
    if record.get("status") != "active":
        raise ImageNotFound(f"Glance image {image_id} is {record.get('status')!r}, not active")
    disk_format = record.get("disk_format")
    if disk_format not in ACCEPTED_DISK_FORMATS:
        raise UnsafeImage(f"Glance image {image_id} has disk_format {disk_format!r}; only raw and qcow2")
    algo, value = record.get("os_hash_algo"), record.get("os_hash_value")
    digests: dict[str, str] = {}
    if algo in ("sha256", "sha512") and isinstance(value, str):
        digests[algo] = value.lower()
    min_disk = record.get("min_disk") or 0
    size = record.get("size")
    return ResolvedImage(
        url=file_url,
        sha256=digests.get("sha256"),
        sha512=digests.get("sha512"),
        disk_format=disk_format,
        size=size if isinstance(size, int) else None,
        min_disk_bytes=int(min_disk) * GIB,
    )
