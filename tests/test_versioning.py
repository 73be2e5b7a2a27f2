"""Worker Versioning: a fleet rolls out new workflow code while rebuilds already running finish on the old.

Workers configured as ``rebuild-worker --build-id`` configures them (``WorkerConfig.deployment``): each
rebuild is pinned to the deployment version current when it started, workflow tasks and host activities
alike, so a rebuild that waits days for approval finishes on the code that began it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from temporalio.api.workflowservice.v1 import SetWorkerDeploymentCurrentVersionRequest
from temporalio.client import Client, WorkflowHandle
from temporalio.common import VersioningBehavior
from temporalio.service import RPCError
from temporalio.worker import Worker

from devtools.testbed.fake_host import FakeHost, request_for
from worker import WorkerConfig
from workflows.models import Decision, Outcome, Phase, RebuildResult, host_task_queue, rebuild_workflow_id
from workflows.rebuild import RebuildInstance


@asynccontextmanager
async def workers_of_build(
    client: Client, config: WorkerConfig, queue: str, fake: FakeHost
) -> AsyncIterator[None]:
    deployment = config.deployment()
    async with (
        Worker(client, task_queue=queue, workflows=[RebuildInstance], deployment_config=deployment),
        Worker(
            client,
            task_queue=host_task_queue(config.host),
            activities=fake.activities(),
            deployment_config=deployment,
        ),
    ):
        yield


async def make_current(client: Client, config: WorkerConfig) -> None:
    """`temporal worker deployment set-current-version`, once the server has seen the version's pollers."""
    for _ in range(100):
        try:
            await client.workflow_service.set_worker_deployment_current_version(
                SetWorkerDeploymentCurrentVersionRequest(
                    namespace=client.namespace,
                    deployment_name=config.deployment_name,
                    build_id=config.build_id or "",
                )
            )
            return
        except RPCError:
            await asyncio.sleep(0.2)
    raise AssertionError(f"version {config.build_id} never became current")


async def wait_for_phase(handle: WorkflowHandle[RebuildInstance, RebuildResult], phase: Phase) -> None:
    for _ in range(200):
        if (await handle.query(RebuildInstance.status)).phase == phase:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"never reached {phase}")


async def test_a_running_rebuild_finishes_on_its_old_build_while_new_ones_start_on_the_new(
    client: Client, unique_host: str, tmp_path: Path
) -> None:
    queue = f"wf-{unique_host}"
    v1, v2 = (
        WorkerConfig(
            host=unique_host,
            libvirt_uri="test:///default",
            state_dir=tmp_path,
            build_id=build,
            deployment_name=f"rebuild-{unique_host}",
        )
        for build in ("1.0", "1.1")
    )
    old, new = FakeHost(), FakeHost()
    async with workers_of_build(client, v1, queue, old):
        await make_current(client, v1)
        first = await client.start_workflow(
            RebuildInstance.run,
            request_for(unique_host, instance="vm-old", require_approval=True),
            id=rebuild_workflow_id(unique_host, "vm-old"),
            task_queue=queue,
        )
        await wait_for_phase(first, Phase.AWAIT_APPROVAL)

        # The rollout: the new build's workers join, become current; the old ones keep running.
        async with workers_of_build(client, v2, queue, new):
            await make_current(client, v2)
            second = await client.start_workflow(
                RebuildInstance.run,
                request_for(unique_host, instance="vm-new"),
                id=rebuild_workflow_id(unique_host, "vm-new"),
                task_queue=queue,
            )
            assert (await second.result()).outcome == Outcome.REBUILT
            await first.signal(RebuildInstance.approve, Decision(requested_by="ops"))
            assert (await first.result()).outcome == Outcome.REBUILT
            described = (await first.describe()).raw_description.workflow_execution_info.versioning_info
    # The first rebuild, approved after the rollout, still stopped its instance on the old build.
    assert old.calls.count("inspect_instance") == 1
    assert "stop_instance" in old.calls
    assert new.calls.count("inspect_instance") == 1
    assert described.behavior == VersioningBehavior.PINNED.value
    assert described.deployment_version.build_id == "1.0"
