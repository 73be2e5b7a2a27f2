"""Running qemu-img safely: no shell, an explicit format, and hard resource limits.

A crafted image can make qemu-img allocate or compute without end, so every call runs under ``prlimit``
(address space and CPU time) and a wall-clock timeout. A qemu-img never outlives its caller: when the
activity is cancelled (an abort, a workflow cancel, a worker shutting down), it is killed and reaped.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from activities.errors import DiskToolFailed

ADDRESS_SPACE_LIMIT = 1 << 30
CPU_SECONDS_LIMIT = 30
WALL_SECONDS_LIMIT = 60.0


async def run_qemu_img(*args: str) -> str:
    command = [
        "prlimit",
        f"--as={ADDRESS_SPACE_LIMIT}",
        f"--cpu={CPU_SECONDS_LIMIT}",
        "--",
        "qemu-img",
        *args,
    ]
    process = await asyncio.create_subprocess_exec(
        *command,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), WALL_SECONDS_LIMIT)
    except TimeoutError:
        await _kill(process)
        raise DiskToolFailed(f"qemu-img {args[0]} took longer than {WALL_SECONDS_LIMIT:g} s") from None
    except BaseException:
        await _kill(process)
        raise
    if process.returncode != 0:
        detail = err.decode(errors="replace").strip() or f"exit code {process.returncode}"
        raise DiskToolFailed(f"qemu-img {args[0]} failed: {detail}")
    return out.decode()


async def _kill(process: asyncio.subprocess.Process) -> None:
    if process.returncode is None:
        process.kill()
    # Shielded: a second cancellation must not leave a zombie behind.
    await asyncio.shield(process.wait())


async def image_info(path: str, fmt: str) -> dict[str, Any]:
    """``qemu-img info`` that neither probes the format nor waits for a running guest's lock."""
    out = await run_qemu_img("info", "-U", "-f", fmt, "--output=json", path)
    info: dict[str, Any] = json.loads(out)
    return info


async def create_overlay(path: str, backing: str, backing_fmt: str, size: int) -> None:
    await run_qemu_img("create", "-q", "-f", "qcow2", "-b", backing, "-F", backing_fmt, path, str(size))


async def image_map(path: str, fmt: str, length: int) -> list[dict[str, Any]]:
    """Which of the image's first ``length`` guest bytes hold data, without reading the data itself."""
    out = await run_qemu_img(
        "map", "-U", "-f", fmt, "--output=json", "--start-offset=0", f"--max-length={length}", path
    )
    extents: list[dict[str, Any]] = json.loads(out)
    return extents
