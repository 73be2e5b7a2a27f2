"""Publishing a snapshot to Glance v2, as Nova's ``createImage`` does: create the record, upload the file,
then read the record back and insist that Glance holds exactly our bytes (its ``os_hash_value``).

A retry after a crash uploads into the image the first attempt created (its ID is kept beside the
snapshot's record), so a publish never leaves a second, queued image behind.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
from temporalio import activity

from activities.errors import ImageDownloadError, InvalidRequest, UnsafeImage
from activities.glance import IMAGE_ID, MAX_RECORD_BYTES, GlanceEndpoint
from activities.heartbeat import keep_alive
from activities.network import AddressPolicy, GuardedConnector
from activities.snapshot_store import SnapshotStore
from activities.state import StateDir, write_atomically
from workflows.snapshot_models import PublishedSnapshot, PublishSnapshotInput, SnapshotRecord

CHUNK = 4 << 20
# The upload of a large image takes as long as its bytes take; each read or write must progress.
UPLOAD_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=300)


class SnapshotPublisher:
    def __init__(self, state: StateDir, endpoint: GlanceEndpoint | None, policy: AddressPolicy) -> None:
        self.state = state
        self.store = SnapshotStore(state)
        self.endpoint = endpoint
        self.policy = policy

    @activity.defn
    async def publish_snapshot(self, request: PublishSnapshotInput) -> PublishedSnapshot:
        if self.endpoint is None:
            raise InvalidRequest("this host's worker has no Glance endpoint to publish to (--glance-url)")
        if request.name is not None and (len(request.name) > 255 or not request.name.isprintable()):
            raise InvalidRequest("a Glance image name is at most 255 printable characters")
        record = self.store.get(request.snapshot_id)
        path = self.state.image_path(record.sha256)
        async with (
            keep_alive(),
            aiohttp.ClientSession(connector=GuardedConnector(self.policy), timeout=UPLOAD_TIMEOUT) as session,
        ):
            glance = _Glance(session, self.endpoint)
            image_id = await self._image_to_fill(glance, record, request.name)
            sha512 = await glance.upload(image_id, path)
            await glance.check_holds(image_id, path.stat().st_size, sha512)
        return PublishedSnapshot(
            snapshot_id=record.snapshot_id,
            glance_url=self.endpoint.url,
            glance_image_id=image_id,
            sha512=sha512,
        )

    async def _image_to_fill(self, glance: _Glance, record: SnapshotRecord, name: str | None) -> str:
        """The image an earlier attempt created, while it still waits for its data; else a new one."""
        kept = self.state.snapshot_published(record.snapshot_id)
        if kept.exists():
            image_id = kept.read_text().strip()
            if IMAGE_ID.fullmatch(image_id) and (await glance.record(image_id)).get("status") == "queued":
                return image_id
        image_id = await glance.create(
            {
                "name": name or f"snapshot of {record.instance} ({record.snapshot_id})",
                "disk_format": record.format,
                "container_format": "bare",
                "visibility": "private",
                "rebuild_snapshot_id": record.snapshot_id,
                "rebuild_source_instance_uuid": record.instance_uuid,
            }
        )
        write_atomically(kept, image_id, mode=0o600)
        return image_id


class _Glance:
    """The three Glance v2 calls a publish makes, with the endpoint's token (re-read after a 401)."""

    def __init__(self, session: aiohttp.ClientSession, endpoint: GlanceEndpoint) -> None:
        self.session = session
        self.endpoint = endpoint

    async def _call(self, method: str, path: str, **kwargs: Any) -> tuple[int, bytes]:
        url = f"{self.endpoint.url}{path}"
        for attempt in (1, 2):
            token = self.endpoint.token_for(url)
            headers = {**kwargs.pop("headers", {}), **({"X-Auth-Token": token} if token else {})}
            try:
                async with self.session.request(
                    method, url, headers=headers, allow_redirects=False, **kwargs
                ) as response:
                    body = await response.content.read(MAX_RECORD_BYTES + 1)
                    status = response.status
            except (aiohttp.ClientError, TimeoutError) as err:
                raise ImageDownloadError(f"Glance at {url} unreachable: {err}") from None
            if status == 401 and token:
                self.endpoint.forget_token()  # whatever renews it may have written a new one by now
                if attempt == 1 and "data" not in kwargs:
                    continue
            break
        if len(body) > MAX_RECORD_BYTES:
            raise UnsafeImage(f"Glance's answer to {method} {path} is over {MAX_RECORD_BYTES} bytes")
        if status >= 300:
            raise ImageDownloadError(f"Glance answered {status} to {method} {path}; will retry")
        return status, body

    async def create(self, fields: dict[str, str]) -> str:
        _status, body = await self._call("POST", "/v2/images", json=fields)
        image_id = _json_object(body, "the new image's record").get("id")
        if not isinstance(image_id, str) or not IMAGE_ID.fullmatch(image_id):
            raise UnsafeImage(f"Glance gave the new image an ID that is not one: {str(image_id)[:80]!r}")
        return image_id

    async def record(self, image_id: str) -> dict[str, Any]:
        _status, body = await self._call("GET", f"/v2/images/{image_id}")
        return _json_object(body, f"image {image_id}'s record")

    async def upload(self, image_id: str, path: Path) -> str:
        """The file streamed into the image, hashed on the way; its SHA-512 (Glance's default hash)."""
        digest = hashlib.sha512()

        async def chunks() -> AsyncIterator[bytes]:
            with open(path, "rb") as file:
                while block := await asyncio.to_thread(file.read, CHUNK):
                    digest.update(block)
                    yield block

        headers = {"Content-Type": "application/octet-stream", "Content-Length": str(path.stat().st_size)}
        await self._call("PUT", f"/v2/images/{image_id}/file", data=chunks(), headers=headers)
        return digest.hexdigest()

    async def check_holds(self, image_id: str, size: int, sha512: str) -> None:
        record = await self.record(image_id)
        if record.get("status") != "active":
            raise ImageDownloadError(
                f"Glance image {image_id} is {str(record.get('status'))[:40]!r} after the upload"
            )
        held = (record.get("size"), record.get("os_hash_algo"), record.get("os_hash_value"))
        if held[0] != size or (held[1] == "sha512" and held[2] != sha512):
            raise UnsafeImage(f"Glance image {image_id} does not hold the snapshot's bytes: {held!r}")


def _json_object(body: bytes, what: str) -> dict[str, Any]:
    try:
        parsed = json.loads(body)
    except ValueError:
        raise UnsafeImage(f"Glance's answer for {what} is not JSON") from None
    if not isinstance(parsed, dict):
        raise UnsafeImage(f"Glance's answer for {what} is not a JSON object")
    return parsed
