"""A rebuild reset with `temporal workflow reset` still puts the old disk back when it rolls back.

Reset starts a new run of the workflow (a new run ID) from a point in its history. The backup of the old
root disk was named by the first run, so the undo in the new run must find it under the same name. Real
disk activities on real files (the instance on libvirt's test driver), fakes for the rest.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from temporalio.api.common.v1 import WorkflowExecution
from temporalio.api.enums.v1 import EventType
from temporalio.api.workflowservice.v1 import ResetWorkflowExecutionRequest
from temporalio.client import Client, WorkflowFailureError, WorkflowHandle
from temporalio.exceptions import ApplicationError

from activities.disks import DiskActivities
from activities.state import StateDir
from devtools.testbed.fake_host import FakeHost, request_for, running_workers
from devtools.testbed.libvirt_test_driver import make_instance
from tests.history_recorder import record_history
from tests.test_disks import cached_image, root_format
from workflows.models import Outcome, RebuildResult, rebuild_workflow_id
from workflows.rebuild import RebuildInstance


async def reset_to_last_workflow_task(
    client: Client, handle: WorkflowHandle[RebuildInstance, RebuildResult]
) -> str:
    """What `temporal workflow reset --type LastWorkflowTask` does; returns the new run's ID."""
    history = await handle.fetch_history()
    last_task = max(
        e.event_id for e in history.events if e.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED
    )
    answer = await client.workflow_service.reset_workflow_execution(
        ResetWorkflowExecutionRequest(
            namespace=client.namespace,
            workflow_execution=WorkflowExecution(workflow_id=handle.id),
            reason="test: reset after prepare",
            workflow_task_finish_event_id=last_task,
            request_id=str(uuid.uuid4()),
        )
    )
    return answer.run_id


async def test_a_rebuild_reset_after_prepare_rolls_back_to_the_old_disk(
    client: Client, unique_host: str, tmp_path: Path
) -> None:
    vm = make_instance(tmp_path, running=False, disk_size=8 << 20)
    old_bytes = vm.disk.read_bytes()
    state = StateDir(tmp_path / "state")
    sha, _ = cached_image(state)
    disks = DiskActivities(vm.libvirt, state)
    fake = FakeHost(fail_at="verify_instance")
    fake.hold("start_instance")
    real: list[Callable[..., Any]] = [disks.prepare_root_disk, disks.restore_root_disk, disks.remove_backup]
    async with running_workers(client, unique_host, fake, real) as queue:
        handle = await client.start_workflow(
            RebuildInstance.run,
            request_for(unique_host, sha256=sha),
            id=rebuild_workflow_id(unique_host, "vm-1"),
            task_queue=queue,
        )
        await asyncio.wait_for(fake.reached["start_instance"].wait(), 10)
        first_run = handle.result_run_id
        assert root_format(vm) == "qcow2"  # prepared: the new disk is in place

        new_run = await reset_to_last_workflow_task(client, handle)
        fake.release("start_instance")
        after_reset = client.get_workflow_handle_for(RebuildInstance.run, handle.id, run_id=new_run)
        with pytest.raises(WorkflowFailureError) as caught:
            await after_reset.result()
        status = await after_reset.query(RebuildInstance.status)
        await record_history(after_reset, "rebuild-reset-after-prepare-rolled-back")
    assert new_run != first_run
    assert status.rebuild_id == first_run
    cause = caught.value.cause
    assert isinstance(cause, ApplicationError)
    assert cause.type == "RebuildRolledBack", cause.message
    assert RebuildResult.model_validate(cause.details[0]).outcome == Outcome.ROLLED_BACK
    assert vm.disk.read_bytes() == old_bytes
    assert root_format(vm) == "raw"
    assert sorted(vm.disk.parent.glob(f"{vm.disk.name}.rebuild-*")) == []
