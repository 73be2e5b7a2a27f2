"""qemu-img as the activities run it: limits, and no process left behind when the caller is cancelled."""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path

from activities import qemu_img


def processes_reading(path: Path) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if str(path).encode() in cmdline and b"qemu-img" in cmdline:
            found.append(int(entry.name))
    return found


async def test_a_cancelled_caller_kills_and_reaps_qemu_img(tmp_path: Path) -> None:
    # Opening a FIFO blocks until someone writes: a real qemu-img that does not end by itself.
    fifo = tmp_path / "never-written"
    os.mkfifo(fifo)
    call = asyncio.create_task(qemu_img.image_info(str(fifo), "raw"))
    for _ in range(100):
        if pids := processes_reading(fifo):
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError("qemu-img never started")
    call.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await call
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists(), f"qemu-img {pid} outlived its cancelled caller"
