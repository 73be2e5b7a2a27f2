"""Download throughput of the fetch activity (hash checked, written to the cache) against curl.

Reference, from the same server in the same run: ``curl -o`` alone, and ``curl -o`` then ``sha256sum``.
Also: bytes downloaded twice after a cut at 50 %, against a full re-download.

    .venv/bin/python -m bench.download [--quick]
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import shutil
import subprocess
import tempfile
import unittest.mock
from pathlib import Path

from temporalio.testing import ActivityEnvironment

from activities.errors import ImageDownloadError
from activities.images import ImageActivities
from activities.state import StateDir
from bench.common import QUICK, GiB, MiB, random_file, start_image_server, table, timed
from devtools.image_server import Fault, ImageServer
from devtools.temporal_dev import free_port
from tests.e2e_support import LOOPBACK_POLICY
from workflows.models import FetchImageInput

SIZE = 128 * MiB if QUICK else GiB


async def ours(url: str, sha: str, state: Path) -> float:
    shutil.rmtree(state, ignore_errors=True)
    activities = ImageActivities(StateDir(state), address_policy=LOOPBACK_POLICY)
    subprocess.run(["sync"], check=True)  # no one else's dirty pages in our fsync
    with timed() as took:
        await ActivityEnvironment().run(
            activities.fetch_image, FetchImageInput(url=url, sha256=sha, max_bytes=2 * SIZE)
        )
    return took[0]


def curl(url: str, target: Path, then: list[str] | None = None) -> float:
    """curl -o, optionally followed by a command on the file (sha256sum, sync)."""
    target.unlink(missing_ok=True)
    subprocess.run(["sync"], check=True)
    with timed() as took:
        subprocess.run(["curl", "-sS", "-o", str(target), url], check=True)
        if then:
            subprocess.run([*then, str(target)], check=True, capture_output=True)
    return took[0]


async def resume_cost(workdir: Path) -> tuple[int, int]:
    """Bytes fetched twice when the connection drops at 50 %, and the image size."""
    size = 256 * MiB
    served = workdir / "resume"
    served.mkdir()
    image = random_file(served / "cut.img", size)
    sha = hashlib.sha256(image.read_bytes()).hexdigest()
    server = ImageServer(served)
    await server.start()
    server.faults["cut.img"] = Fault(drop_at_fraction=0.5)
    activities = ImageActivities(StateDir(workdir / "resume-state"), address_policy=LOOPBACK_POLICY)
    request = FetchImageInput(url=server.url("cut.img"), sha256=sha, max_bytes=2 * size)
    for _ in range(3):
        try:
            await ActivityEnvironment().run(activities.fetch_image, request)
            break
        except ImageDownloadError:
            continue
    await server.stop()
    return server.bytes_sent("cut.img") - size, size


def without_fsync() -> contextlib.AbstractContextManager[object]:
    """For the breakdown row only: what the fetch costs when its fsync is skipped."""
    return unittest.mock.patch("activities.images.os.fsync", lambda _fd: None)


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="bench-download-", dir="/var/tmp") as tmp:
        workdir = Path(tmp)
        served = workdir / "served"
        served.mkdir()
        image = random_file(served / "image.raw", SIZE)
        sha = hashlib.sha256(image.read_bytes()).hexdigest()
        port = free_port()
        server = start_image_server(served, port)
        url = f"http://127.0.0.1:{port}/image.raw"
        try:
            curl(url, workdir / "warm")  # page cache warm for everyone
            runs = 1 if QUICK else 3
            curl_alone = min(curl(url, workdir / "curl.out") for _ in range(runs))
            curl_hash = min(curl(url, workdir / "curl.out", ["sha256sum"]) for _ in range(runs))
            curl_sync = min(curl(url, workdir / "curl.out", ["sync"]) for _ in range(runs))
            ours_best = min(asyncio.run(ours(url, sha, workdir / "state")) for _ in range(runs))
            with without_fsync():
                ours_nosync = min(asyncio.run(ours(url, sha, workdir / "state")) for _ in range(runs))
        finally:
            server.terminate()
        again, size = asyncio.run(resume_cost(workdir))
    mib = SIZE / MiB
    table(
        f"Download of a {mib:.0f} MiB image from a local aiohttp server",
        [
            ("fetch activity (SHA-256 while streaming, into the cache)", f"{mib / ours_best:.0f} MiB/s",
             f"curl -o: {mib / curl_alone:.0f} MiB/s", f"{curl_alone / ours_best:.2f}x curl (>= 1.0)"),
            ("fetch activity with its fsync skipped (breakdown only)", f"{mib / ours_nosync:.0f} MiB/s",
             f"curl -o: {mib / curl_alone:.0f} MiB/s", f"{curl_alone / ours_nosync:.2f}x curl"),
            ("same, against curl -o then sha256sum", f"{ours_best:.2f} s", f"{curl_hash:.2f} s",
             f"{curl_hash / ours_best:.2f}x"),
            ("same, against curl -o then sync (we fsync before the rename)", f"{ours_best:.2f} s",
             f"{curl_sync:.2f} s", f"{curl_sync / ours_best:.2f}x"),
            ("bytes fetched twice after a cut at 50 %", f"{again / MiB:.2f} MiB", f"{size / MiB:.0f} MiB",
             f"{100 * again / size:.1f} % (<= 5 %)"),
        ],
    )  # fmt: skip


if __name__ == "__main__":
    main()
