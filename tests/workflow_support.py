"""Running the real RebuildInstance on fake hosts, for the workflow tests: start, hold, wait, read the end."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from temporalio.client import Client, WorkflowFailureError, WorkflowHandle
from temporalio.common import WorkflowIDConflictPolicy
from temporalio.exceptions import ApplicationError

from tests.fake_host import FakeHost, request_for, running_workers
from workflows.models import Outcome, Phase, RebuildRequest, RebuildResult, rebuild_workflow_id
from workflows.rebuild import RebuildInstance

Handle = WorkflowHandle[RebuildInstance, RebuildResult]
BEFORE_STOP = ["inspect_instance", "fetch_image", "check_image"]
MAIN_PATH = [
    *BEFORE_STOP,
    "stop_instance",
    "prepare_root_disk",
    "start_instance",
    "verify_instance",
    "remove_backup",
    "record_image",
]


async def start(client: Client, queue: str, request: RebuildRequest) -> Handle:
    return await client.start_workflow(
        RebuildInstance.run,
        request,
        id=rebuild_workflow_id(request.host, request.instance),
        task_queue=queue,
        id_conflict_policy=WorkflowIDConflictPolicy.FAIL,
    )


def rolled_back(failure: WorkflowFailureError) -> tuple[ApplicationError, RebuildResult]:
    cause = failure.cause
    assert isinstance(cause, ApplicationError)
    return cause, RebuildResult.model_validate(cause.details[0])


@asynccontextmanager
async def rebuilding(
    client: Client, host: str, fake: FakeHost, held: str | None = None, **request: Any
) -> AsyncIterator[Handle]:
    """A rebuild on the fake host; with ``held``, once it waits in that activity."""
    if held is not None:
        fake.hold(held)
    async with running_workers(client, host, fake) as queue:
        handle = await start(client, queue, request_for(host, **request))
        if held is not None:
            await asyncio.wait_for(fake.reached[held].wait(), 30)
        yield handle


async def failure_of(handle: Handle) -> tuple[ApplicationError, RebuildResult]:
    """The workflow's failure (it must fail) and the result it carries."""
    with pytest.raises(WorkflowFailureError) as caught:
        await handle.result()
    return rolled_back(caught.value)


async def outcome_of(handle: Handle) -> Outcome:
    try:
        return (await handle.result()).outcome
    except WorkflowFailureError as failure:
        return rolled_back(failure)[1].outcome


async def wait_for_phase(handle: Handle, phase: Phase) -> None:
    for _ in range(200):
        if (await handle.query(RebuildInstance.status)).phase == phase:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"never reached phase {phase}")
