"""Download throughput of the fetch activity (hash checked, written to the cache) against curl.

The server is nginx from Debian's packages with ``sendfile`` serving from the page cache (started and
stopped here), so the server costs little and both clients meet the same one. Reference, from the same
server in the same run, the three floors: ``curl -o`` alone, ``curl -o`` then ``sync``, ``curl -o``
then ``openssl dgst -sha256``; and a breakdown of where our time goes (receiving alone, hashing
alone, CPU seconds). Each figure is the median of several runs.
Also: bytes downloaded twice after a cut at 50 %, against a full re-download.

    .venv/bin/python -m bench.download [--quick]
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import shutil
import statistics
import subprocess
import tempfile
import unittest.mock
from pathlib import Path

import aiohttp
from temporalio.testing import ActivityEnvironment

from activities.errors import ImageDownloadError
from activities.image_fetch import READ_BUFFER_BYTES
from activities.images import ImageActivities
from activities.state import StateDir
from bench.common import QUICK, GiB, MiB, random_file, table, timed
from bench.nginx import nginx_serving
from devtools.image_server import Fault, ImageServer
from devtools.temporal_dev import free_port
from devtools.testbed.e2e import LOOPBACK_POLICY
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
    """curl -o, optionally followed by a command on the file (openssl dgst -sha256, sync)."""
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
    return unittest.mock.patch("activities.image_fetch.os.fsync", lambda _fd: None)


async def receive_only(url: str) -> float:
    """The same aiohttp client reading the body and dropping it: the network side alone."""
    with timed() as took:
        async with (
            aiohttp.ClientSession(read_bufsize=READ_BUFFER_BYTES) as session,
            session.get(url) as response,
        ):
            async for _chunk in response.content.iter_any():
                pass
    return took[0]


def hash_only(path: Path) -> float:
    """SHA-256 of the image from the page cache in this process: the hashing side alone."""
    digest = hashlib.sha256()
    with timed() as took, open(path, "rb") as image:
        while block := image.read(4 * MiB):
            digest.update(block)
    return took[0]


def cpu_now() -> float:
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="bench-download-", dir="/var/tmp") as tmp:
        workdir = Path(tmp)
        os.chmod(workdir, 0o755)
        served = workdir / "served"
        served.mkdir()
        image = random_file(served / "image.raw", SIZE)
        sha = hashlib.sha256(image.read_bytes()).hexdigest()
        runs = 3 if QUICK else 5
        median = statistics.median
        with nginx_serving(served, free_port(), workdir / "nginx") as base:
            url = f"{base}/image.raw"
            curl(url, workdir / "warm")  # page cache warm for everyone
            began = cpu_now()
            curl_alone = median([curl(url, workdir / "curl.out") for _ in range(runs)])
            curl_cpu = (cpu_now() - began) / runs
            curl_hash = median(
                [curl(url, workdir / "curl.out", ["openssl", "dgst", "-sha256"]) for _ in range(runs)]
            )
            curl_sync = median([curl(url, workdir / "curl.out", ["sync"]) for _ in range(runs)])
            began = cpu_now()
            ours_best = median([asyncio.run(ours(url, sha, workdir / "state")) for _ in range(runs)])
            ours_cpu = (cpu_now() - began) / runs
            with without_fsync():
                ours_nosync = median([asyncio.run(ours(url, sha, workdir / "state")) for _ in range(runs)])
            received = min(asyncio.run(receive_only(url)) for _ in range(runs))
        hashed = min(hash_only(image) for _ in range(runs))
        again, size = asyncio.run(resume_cost(workdir))
    mib = SIZE / MiB
    print(
        "\nA durable download cannot be faster than the disk takes its bytes; curl -o only fills the page"
        "\ncache. Where the disk's rate (below) is under curl's, the first row stays under 1.0x curl."
    )
    print(f"\nload average while measured: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    table(
        f"Download of a {mib:.0f} MiB image from nginx (sendfile, page cache), same run",
        [
            ("fetch activity (SHA-256 while streaming, written back as it goes, fsync, rename)",
             f"{mib / ours_best:.0f} MiB/s", f"curl -o: {mib / curl_alone:.0f} MiB/s",
             f"{curl_alone / ours_best:.2f}x curl (>= 0.8)"),
            ("the same without its final fsync (breakdown only)", f"{mib / ours_nosync:.0f} MiB/s",
             f"curl -o: {mib / curl_alone:.0f} MiB/s", f"{curl_alone / ours_nosync:.2f}x curl"),
            ("the same, against curl -o then sync", f"{ours_best:.2f} s", f"{curl_sync:.2f} s",
             f"{curl_sync / ours_best:.2f}x (>= 1.0)"),
            ("the same, against curl -o then openssl dgst -sha256", f"{ours_best:.2f} s",
             f"{curl_hash:.2f} s", f"{curl_hash / ours_best:.2f}x"),
            ("profile: aiohttp receiving and dropping the body", f"{mib / received:.0f} MiB/s", "", ""),
            ("profile: SHA-256 alone, one core, from page cache", f"{mib / hashed:.0f} MiB/s", "", ""),
            ("profile: the disk taking the image's write-back (the sync after curl -o)",
             f"{mib / max(curl_sync - curl_alone, 1e-9):.0f} MiB/s", "", "bounds any durable download"),
            ("profile: CPU seconds per download (user + system)", f"fetch {ours_cpu:.2f} s",
             f"curl -o: {curl_cpu:.2f} s", ""),
            ("bytes fetched twice after a cut at 50 %", f"{again / MiB:.2f} MiB", f"{size / MiB:.0f} MiB",
             f"{100 * again / size:.1f} % (<= 5 %)"),
        ],
    )  # fmt: skip


if __name__ == "__main__":
    main()
