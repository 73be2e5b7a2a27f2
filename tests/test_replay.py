"""Saved histories of real rebuilds, replayed against today's workflow code.

A change to the workflow that would break rebuilds already running (a step added, removed or
reordered without ``workflow.patched``) fails here. Every path a rebuild can take has a history made by
today's workflow version; histories of older versions stay, never overwritten, because rebuilds started
on them may still be running. Record with ``REBUILD_RECORD_HISTORIES=1`` on the workflow tests
(tests/history_recorder.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from temporalio.client import WorkflowHistory
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.worker import Replayer

from tests.history_recorder import WORKFLOW_VERSION, history_path
from workflows.fleet import FleetRebuild
from workflows.inventory import InstanceInventory
from workflows.rebuild import RebuildInstance
from workflows.snapshot import SNAPSHOT_WORKFLOWS

HISTORIES = sorted((Path(__file__).parent / "histories").glob("*.json"))
ABORTABLE_PHASES = (
    "inspect", "fetch", "check", "await-approval", "stop", "prepare", "start", "verify", "confirm-window",
)  # fmt: skip
PATHS = (
    "rebuild-happy-path",
    "rebuild-approved",
    "rebuild-confirmed-in-confirm-window",
    "rebuild-reverted-in-confirm-window",
    "rebuild-rolled-back-at-verify",
    "rebuild-cancelled-in-prepare",
    *(f"rebuild-aborted-in-{phase}" for phase in ABORTABLE_PHASES),
    "rebuild-abort-refused-in-cleanup",
    "rebuild-cleanup-failed-for-good",
    "rebuild-from-glance",
    "rebuild-reset-after-prepare-rolled-back",
    "rebuild-with-identity",
    "rebuild-keeping-identity",
    "rebuild-with-identity-rolled-back",
    "rebuild-with-preflight",
    "rebuild-failed-in-preflight",
    "rebuild-from-snapshot",
    "rebuild-dry-run",
)
# SnapshotInstance has no patches yet: its histories are named by their path alone.
SNAPSHOT_PATHS = ("snapshot-taken-then-pruned", "snapshot-fails-undone", "snapshot-cancelled-undone")
# InstanceInventory (`rebuild instances`): one host answered, one had no worker.
INVENTORY_PATHS = ("instances-one-host-silent",)


@pytest.mark.parametrize("name", PATHS)
def test_every_path_has_a_history_of_todays_version(name: str) -> None:
    assert history_path(name).exists(), (
        f"no {name} history of workflow version {WORKFLOW_VERSION}: "
        "run the workflow tests with REBUILD_RECORD_HISTORIES=1"
    )


@pytest.mark.parametrize("name", SNAPSHOT_PATHS)
def test_every_snapshot_path_has_a_history(name: str) -> None:
    assert (Path(__file__).parent / "histories" / f"{name}.json").exists()


@pytest.mark.parametrize("name", INVENTORY_PATHS)
def test_every_inventory_path_has_a_history(name: str) -> None:
    assert (Path(__file__).parent / "histories" / f"{name}.json").exists()


@pytest.mark.parametrize("path", HISTORIES, ids=[p.stem for p in HISTORIES])
async def test_history_replays(path: Path) -> None:
    history = WorkflowHistory.from_json(path.stem, path.read_text())
    replayer = Replayer(
        workflows=[RebuildInstance, FleetRebuild, InstanceInventory, *SNAPSHOT_WORKFLOWS],
        data_converter=pydantic_data_converter,
    )
    await replayer.replay_workflow(history)
