"""Saving workflow histories for the replay test (``REBUILD_RECORD_HISTORIES=1``).

Old histories are the point: they are what rebuilds started on older code look like, and today's code
must still replay them. So a file is never overwritten; a history of a path that changed is saved under
the name of the workflow version that made it (the newest patch ID), next to the older ones.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from temporalio.client import WorkflowHandle

HISTORIES = Path(__file__).parent / "histories"
# The newest patch in workflows/rebuild.py: histories recorded by today's code carry it in their name.
WORKFLOW_VERSION = "stage-root-disk-before-stop"
# Paths only a newer patch takes are named by that patch (every other path's history is unchanged by it).
SWAP_IN_ONE_STEP = "swap-root-disk-in-one-step"
CLEAN_UP_IN_ONE_STEP = "clean-up-in-one-step"


def history_path(name: str, version: str = WORKFLOW_VERSION) -> Path:
    return HISTORIES / f"{name}--{version}.json"


async def record_history(
    handle: WorkflowHandle[Any, Any], name: str, version: str = WORKFLOW_VERSION
) -> Path | None:
    """Save the history when asked to; returns where, or None (not asked, or already saved)."""
    return await _record(handle, history_path(name, version))


async def record_patched_history(handle: WorkflowHandle[Any, Any], name: str, patch: str) -> Path | None:
    """A path only a newer patch takes (asked only where it applies): named after that patch, so
    ``WORKFLOW_VERSION`` and the other paths' histories stay as they are."""
    return await _record(handle, HISTORIES / f"{name}--{patch}.json")


async def record_fleet_history(handle: WorkflowHandle[Any, Any], name: str) -> Path | None:
    """The same for a fleet's history, named by its path alone (the fleet's patches are few)."""
    return await _record(handle, HISTORIES / f"{name}.json")


async def _record(handle: WorkflowHandle[Any, Any], path: Path) -> Path | None:
    if os.environ.get("REBUILD_RECORD_HISTORIES") != "1":
        return None
    if path.exists():
        return None
    history = await handle.fetch_history()
    HISTORIES.mkdir(exist_ok=True)
    # Exclusive create: two tests recording the same path at once must not overwrite each other.
    with open(path, "x") as out:
        out.write(json.dumps(json.loads(history.to_json()), indent=1))
    return path
