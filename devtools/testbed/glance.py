"""A fake Glance v2 for tests: the records and file downloads a rebuild reads, and the create and upload
a snapshot's publish makes, with token checking. Like Glance, it computes the uploaded file's SHA-512."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from aiohttp import web

from activities.glance import GlanceEndpoint
from devtools.temporal_dev import free_port

TOKEN = "glance-token-1"


class FakeGlance:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.records: dict[str, dict[str, Any]] = {}
        self.file_tokens: list[str | None] = []
        # Set to make the next upload store other bytes than it was sent (a broken store).
        self.corrupt_next_upload = False
        self.app = web.Application(client_max_size=1 << 30)
        self.app.router.add_get("/v2/images/{id}", self.record)
        self.app.router.add_get("/v2/images/{id}/file", self.file)
        self.app.router.add_post("/v2/images", self.create)
        self.app.router.add_put("/v2/images/{id}/file", self.upload)
        self.port = free_port()

    def add(self, path: Path, **fields: Any) -> str:
        image_id = str(uuid.uuid4())
        data = path.read_bytes()
        self.records[image_id] = {
            "id": image_id,
            "status": "active",
            "disk_format": "qcow2" if data.startswith(b"QFI\xfb") else "raw",
            "os_hash_algo": "sha512",
            "os_hash_value": hashlib.sha512(data).hexdigest(),
            "size": len(data),
            "min_disk": 0,
            "file": f"/v2/images/{image_id}/file",
            "path": str(path),
            **fields,
        }
        return image_id

    def _refused(self, request: web.Request) -> web.Response | None:
        return None if request.headers.get("X-Auth-Token") == TOKEN else web.Response(status=401)

    async def record(self, request: web.Request) -> web.Response:
        if refused := self._refused(request):
            return refused
        record = self.records.get(request.match_info["id"])
        if record is None:
            return web.Response(status=404)
        return web.json_response({k: v for k, v in record.items() if k != "path"})

    async def file(self, request: web.Request) -> web.StreamResponse:
        self.file_tokens.append(request.headers.get("X-Auth-Token"))
        if refused := self._refused(request):
            return refused
        return web.FileResponse(self.records[request.match_info["id"]]["path"])

    async def create(self, request: web.Request) -> web.Response:
        if refused := self._refused(request):
            return refused
        fields = await request.json()
        image_id = str(uuid.uuid4())
        self.records[image_id] = {**fields, "id": image_id, "status": "queued", "min_disk": 0,
                                  "file": f"/v2/images/{image_id}/file"}  # fmt: skip
        return web.json_response(self.records[image_id], status=201)

    async def upload(self, request: web.Request) -> web.Response:
        if refused := self._refused(request):
            return refused
        record = self.records.get(request.match_info["id"])
        if record is None or record["status"] != "queued":
            return web.Response(status=409)
        path = self.directory / f"glance-{record['id']}"
        digest = hashlib.sha512()
        size = 0
        with open(path, "wb") as out:
            async for chunk in request.content.iter_chunked(1 << 20):
                if self.corrupt_next_upload:
                    chunk, self.corrupt_next_upload = b"X" + chunk[1:], False
                out.write(chunk)
                digest.update(chunk)
                size += len(chunk)
        record.update(status="active", size=size, os_hash_algo="sha512", os_hash_value=digest.hexdigest(),
                      path=str(path))  # fmt: skip
        return web.Response(status=204)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def endpoint_for(glance: FakeGlance, token_file: Path) -> GlanceEndpoint:
    """The worker's Glance endpoint, as its operator configures it (the fake speaks plain http)."""
    if not token_file.exists():
        token_file.write_text(TOKEN)
    return GlanceEndpoint(glance.url, token_file, allow_http=True)


@asynccontextmanager
async def running_glance(directory: Path) -> AsyncIterator[FakeGlance]:
    server = FakeGlance(directory)
    runner = web.AppRunner(server.app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", server.port).start()
    try:
        yield server
    finally:
        await runner.cleanup()
