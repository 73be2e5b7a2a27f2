"""Heartbeats for activities that wait on something else (qemu-img, libvirt).

A step with a heartbeat timeout that goes quiet is declared dead and retried elsewhere, and only a
heartbeating activity hears that its workflow asked it to stop. So every host activity heartbeats while
it works, not only the long download.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from temporalio import activity

BEAT_SECONDS = 2.0


@contextlib.asynccontextmanager
async def keep_alive(*details: Any, every: float = BEAT_SECONDS) -> AsyncIterator[None]:
    """Heartbeat (with ``details``, progress to show) until the block ends."""

    async def beat() -> None:
        while True:
            activity.heartbeat(*details)
            await asyncio.sleep(every)

    task = asyncio.create_task(beat())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
