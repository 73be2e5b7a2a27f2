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


async def run_qemu_img(
    *args: str, wall_seconds: float = WALL_SECONDS_LIMIT, cpu_seconds: int = CPU_SECONDS_LIMIT
) -> str:
    command = [
        "prlimit",
        f"--as={ADDRESS_SPACE_LIMIT}",
        f"--cpu={cpu_seconds}",
        "--",
        "qemu-img",
        *args,
    ]
    code, out, err = await run_killable(command, wall_seconds, f"qemu-img {args[0]}")
    if code != 0:
        detail = err.decode(errors="replace").strip() or f"exit code {code}"
        raise DiskToolFailed(f"qemu-img {args[0]} failed: {detail}")
    return out.decode()


async def run_killable(command: list[str], wall_seconds: float, what: str) -> tuple[int | None, bytes, bytes]:
    """``command`` (an argument list, no shell) to its end: its exit code, stdout and stderr. Killed, and
    reaped, when it outlasts ``wall_seconds`` (``DiskToolFailed``) or the caller is cancelled: a disk
    tool never outlives the activity that ran it."""
    process = await asyncio.create_subprocess_exec(
        *command,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), wall_seconds)
    except TimeoutError:
        await _kill(process)
        raise DiskToolFailed(f"{what} took longer than {wall_seconds:g} s") from None
    except BaseException:
        await _kill(process)
        raise
    return process.returncode, out, err


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


# Writing a whole image takes as long as its bytes take: bounded by the activity's own timeout, and
# by these generous limits (the address space limit stays: convert streams, it does not hold an image).
CONVERT_SECONDS_LIMIT = 2 * 3600.0


async def convert_into(
    source: str, source_fmt: str, target: str, target_fmt: str, *, create: bool = False
) -> None:
    """The image's guest-visible bytes written into an existing ``target`` (a volume, a device), or
    with ``create`` into a new file (sparse: zeroes are left as holes)."""
    existing = () if create else ("-n",)
    await run_qemu_img(
        "convert", *existing, "-q", "-f", source_fmt, "-O", target_fmt, source, target,
        wall_seconds=CONVERT_SECONDS_LIMIT, cpu_seconds=int(CONVERT_SECONDS_LIMIT),
    )  # fmt: skip


async def resize(path: str, fmt: str, size: int) -> None:
    """Grow the disk to ``size`` guest bytes (a qcow2 file: its header says; never shrinks a disk)."""
    await run_qemu_img("resize", "-q", "-f", fmt, path, str(size))
