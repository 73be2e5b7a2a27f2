"""Saved histories of real rebuilds, replayed against today's workflow code.

A change to the workflow that would break rebuilds already running (a step added, removed or
reordered without ``workflow.patched``) fails here. New histories are recorded by running the
workflow tests with ``REBUILD_RECORD_HISTORIES=1``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from temporalio.client import WorkflowHistory
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.worker import Replayer

from workflows.rebuild import RebuildInstance

HISTORIES = sorted((Path(__file__).parent / "histories").glob("*.json"))


def test_histories_exist() -> None:
    assert len(HISTORIES) >= 2, "tests/histories/ must hold saved rebuild histories"


@pytest.mark.parametrize("path", HISTORIES, ids=[p.stem for p in HISTORIES])
async def test_history_replays(path: Path) -> None:
    history = WorkflowHistory.from_json(path.stem, path.read_text())
    replayer = Replayer(workflows=[RebuildInstance], data_converter=pydantic_data_converter)
    await replayer.replay_workflow(history)
