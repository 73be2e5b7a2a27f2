"""An HTTP image server with Range support and injectable faults, for the demo and the tests.

Faults are set per file name while the server runs, so one server serves a test its whole story: a
connection dropped half-way, a 500 before the right answer, a server that ignores Range, a body cut
short under a correct Content-Length, a slow or stalled body.
"""

from __future__ import annotations

import argparse
import asyncio
import re
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

from devtools.temporal_dev import free_port

CHUNK = 64 * 1024
_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")


@dataclass
class Fault:
    """What to do wrong, for how many requests (``times``); statuses are served first, one each."""

    statuses: list[int] = field(default_factory=list)
    drop_at_fraction: float | None = None
    ignore_range: bool = False
    truncate_at_fraction: float | None = None
    seconds_per_chunk: float = 0.0
    stall_at_fraction: float | None = None
    # Send the body without Content-Length (chunked), as some servers and proxies do.
    hide_length: bool = False
    times: int = 1
    # The fault that applies once this one is used up, for a story over several requests.
    then: Fault | None = None

    @property
    def shapes_body(self) -> bool:
        """Whether a body is still to be served wrong once the injected statuses are used up."""
        return (
            self.drop_at_fraction is not None
            or self.ignore_range
            or self.truncate_at_fraction is not None
            or bool(self.seconds_per_chunk)
            or self.stall_at_fraction is not None
            or self.hide_length
        )


@dataclass
class RequestLog:
    path: str
    range_header: str | None
    status: int
    bytes_sent: int = 0


class ImageServer:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.faults: dict[str, Fault] = {}
        self.requests: list[RequestLog] = []
        self.app = web.Application()
        self.app.router.add_get("/{name}", self._serve)
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, name: str) -> str:
        return f"{self.base_url}/{name}"

    def bytes_sent(self, name: str) -> int:
        return sum(r.bytes_sent for r in self.requests if r.path == name)

    async def start(self, port: int = 0) -> None:
        self.port = port or free_port()
        # A stalled body (a fault) never ends by itself: do not wait a minute for it at shutdown.
        self._runner = web.AppRunner(self.app, shutdown_timeout=1.0)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def _fault(self, name: str) -> Fault | None:
        fault = self.faults.get(name)
        while fault is not None and fault.times <= 0 and fault.then is not None:
            fault = self.faults[name] = fault.then
        if fault is None or fault.times <= 0:
            return None
        return fault

    async def _serve(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        path = self.directory / name
        range_header = request.headers.get("Range")
        log = RequestLog(path=name, range_header=range_header, status=200)
        self.requests.append(log)
        if "/" in name or not path.is_file():
            log.status = 404
            raise web.HTTPNotFound()
        fault = self._fault(name)
        if fault and fault.statuses:
            log.status = fault.statuses.pop(0)
            if not fault.statuses and not fault.shapes_body:
                fault.times -= 1
            return web.Response(status=log.status, text="injected fault\n")
        size = path.stat().st_size
        start, end = 0, size - 1
        match = _RANGE.match(range_header or "")
        if match and not (fault and fault.ignore_range):
            start = int(match.group(1))
            if match.group(2):
                end = min(int(match.group(2)), size - 1)
            if start >= size:
                log.status = 416
                return web.Response(status=416, headers={"Content-Range": f"bytes */{size}"})
            log.status = 206
        response = web.StreamResponse(status=log.status)
        if not (fault and fault.hide_length):
            response.content_length = end - start + 1
        response.headers["Accept-Ranges"] = "bytes"
        if log.status == 206:
            response.headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        await response.prepare(request)
        if request.method == "HEAD":
            return response
        cut = None
        stall = None
        if fault:
            fault.times -= 1
            if fault.drop_at_fraction is not None:
                cut = int(size * fault.drop_at_fraction)
            if fault.truncate_at_fraction is not None:
                cut = int(size * fault.truncate_at_fraction)
            if fault.stall_at_fraction is not None:
                stall = int(size * fault.stall_at_fraction)
        position = start
        with open(path, "rb") as image:
            image.seek(start)
            while position <= end:
                if cut is not None and position >= cut:
                    # Close the connection mid-body: the client sees fewer bytes than promised.
                    assert request.transport is not None
                    request.transport.close()
                    return response
                if stall is not None and position >= stall:
                    await asyncio.sleep(3600)
                limit = end + 1 - position
                if cut is not None:
                    limit = min(limit, cut - position)
                if stall is not None:
                    limit = min(limit, max(stall - position, 1))
                chunk = image.read(min(CHUNK, limit))
                if not chunk:
                    break
                try:
                    await response.write(chunk)
                except ConnectionError:
                    # The client hung up (a refused size, a cancelled download): not a server error.
                    return response
                log.bytes_sent += len(chunk)
                position += len(chunk)
                if fault and fault.seconds_per_chunk:
                    await asyncio.sleep(fault.seconds_per_chunk)
        await response.write_eof()
        return response


def main() -> None:
    parser = argparse.ArgumentParser(description="Serve disk images over HTTP with Range support.")
    parser.add_argument("directory", type=Path)
    parser.add_argument("--port", type=int, default=8088)
    args = parser.parse_args()

    async def serve() -> None:
        server = ImageServer(args.directory)
        await server.start(args.port)
        print(f"serving {args.directory} at {server.base_url}", flush=True)
        await asyncio.Event().wait()

    asyncio.run(serve())


if __name__ == "__main__":
    main()
