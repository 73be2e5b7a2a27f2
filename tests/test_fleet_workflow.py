"""The FleetRebuild workflow on the real dev server, with fake host activities (tests/fake_host.py).

What the pure plan (tests/test_fleet_plan.py) cannot show: how the workflow meets its host's activities,
its children and its updates.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Any

import pytest
from temporalio import activity
from temporalio.client import Client, WorkflowFailureError, WorkflowHandle
from temporalio.exceptions import ApplicationError
from temporalio.worker import Worker

from tests.fake_host import FakeHost
from tests.history_recorder import record_fleet_history
from workflows.activity_models import HostInventory, InventoryEntry, ListInstancesInput
from workflows.fleet import FleetRebuild
from workflows.fleet_models import (
    ControlAnswer,
    FleetAbort,
    FleetLimits,
    FleetReport,
    FleetRequest,
    RebuildOptions,
    Selection,
)
from workflows.names import ABORT_FLEET_UPDATE, FLEET_WORKFLOW, fleet_workflow_id, host_task_queue
from workflows.names import rebuild_workflow_id as child_id
from workflows.rebuild import RebuildInstance

GLANCE = {
    "glance_url": "http://glance.invalid:9292",
    "glance_image_id": "0b9f2f0e-5c6a-4a4e-9f57-2d7f9c1a0b11",
}


def listing(*names: str) -> Callable[..., Any]:
    @activity.defn(name="list_instances")
    async def list_instances(request: ListInstancesInput) -> HostInventory:
        return HostInventory(instances=[InventoryEntry(instance=name, running=True) for name in names])

    return list_instances


@asynccontextmanager
async def host_worker(client: Client, host: str, fake: FakeHost) -> AsyncIterator[None]:
    async with Worker(
        client,
        task_queue=host_task_queue(host),
        activities=[*fake.activities(), listing("vm-1")],
        max_heartbeat_throttle_interval=timedelta(milliseconds=200),
    ):
        yield


def workflow_worker(client: Client, queue: str) -> Worker:
    return Worker(client, task_queue=queue, workflows=[FleetRebuild, RebuildInstance])


def fleet(name: str, host: str, **rebuild: Any) -> FleetRequest:
    return FleetRequest(
        name=name,
        rebuild=RebuildOptions(**rebuild),
        selection=Selection(hosts=[host], name_pattern="vm-*"),
        limits=FleetLimits(max_failures=3),
        prefetch=True,
    )


async def start(client: Client, request: FleetRequest, queue: str) -> WorkflowHandle[Any, Any]:
    return await client.start_workflow(
        FLEET_WORKFLOW, request, id=fleet_workflow_id(request.name), task_queue=queue
    )


async def test_a_disk_format_that_contradicts_glance_fails_the_prefetch_not_every_child(
    client: Client, unique_host: str
) -> None:
    fake = FakeHost()  # its Glance record says qcow2
    queue = f"fleet-{unique_host}"
    request = fleet(f"format-{unique_host}", unique_host, disk_format="raw", **GLANCE)
    async with host_worker(client, unique_host, fake), workflow_worker(client, queue):
        handle = await start(client, request, queue)
        with pytest.raises(WorkflowFailureError) as failed:
            await asyncio.wait_for(handle.result(), 60)
        await record_fleet_history(handle, "fleet-prefetch-refused-a-format-glance-contradicts")
    cause = failed.value.cause
    assert isinstance(cause, ApplicationError) and cause.type == "FleetPrefetchFailed"
    assert f"Glance says image {GLANCE['glance_image_id']} is qcow2, the request says raw" in cause.message
    assert "nothing was started" in cause.message
    # Refused at the record, as a single rebuild refuses it: nothing downloaded, no child started.
    assert fake.calls == ["resolve_glance_image"]


async def test_an_abort_that_is_still_signalling_children_answers_before_the_fleet_ends(
    client: Client, unique_host: str
) -> None:
    fake = FakeHost()
    fake.hold("fetch_image")
    queue = f"fleet-{unique_host}"
    request = fleet(f"abort-{unique_host}", unique_host, image_url="http://images.invalid/new.qcow2")
    request = request.model_copy(update={"prefetch": False})
    async with host_worker(client, unique_host, fake):
        async with workflow_worker(client, queue):
            handle = await start(client, request, queue)
            await asyncio.wait_for(fake.reached["fetch_image"].wait(), 30)
        # With no workflow worker, the child's end and the abort reach the fleet in one workflow task:
        # the abort signals a child that has already ended while the fleet sees it has nothing left.
        await client.get_workflow_handle(child_id(unique_host, "vm-1")).terminate("test")
        update = asyncio.create_task(
            handle.execute_update(
                ABORT_FLEET_UPDATE,
                FleetAbort(reason="wrong image", requested_by="test"),
                result_type=ControlAnswer,
            )
        )
        await asyncio.sleep(1)
        async with workflow_worker(client, queue):
            answer = await asyncio.wait_for(update, 60)
            report = FleetReport.model_validate(await asyncio.wait_for(handle.result(), 60))
            await record_fleet_history(handle, "fleet-abort-answered-before-the-fleet-ends")
    assert answer.accepted and "1 running rebuild(s) asked to roll back" in answer.message
    assert report.stop_reason == "aborted: wrong image (by test)"
