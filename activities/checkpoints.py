"""Named pause points inside activities, so crash tests can kill a worker at an exact line.

Off unless the worker is started with a pause directory (``--pause-dir`` or ``REBUILD_PAUSE_DIR``). A test
creates ``<dir>/<name>``; the activity that reaches ``name`` writes ``<dir>/<name>.reached`` and waits,
heartbeating, until the test removes ``<dir>/<name>`` (or kills the worker, which is the point).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from temporalio import activity


class Checkpoints:
    def __init__(self, pause_dir: Path | None = None) -> None:
        self.pause_dir = pause_dir

    async def reach(self, name: str) -> None:
        if self.pause_dir is None:
            return
        gate = self.pause_dir / name
        if not gate.exists():
            return
        attempt = activity.info().attempt if activity.in_activity() else 0
        (self.pause_dir / f"{name}.reached").write_text(str(attempt))
        while gate.exists():
            if activity.in_activity():
                activity.heartbeat()
            await asyncio.sleep(0.1)
