"""Prometheus metrics: the SDK's runtime metrics and the project's own, from real rebuilds."""

from __future__ import annotations

import contextlib

import aiohttp
from temporalio.client import Client, WorkflowFailureError

from common.connection import connect, prometheus_runtime
from devtools.temporal_dev import DevServer, free_port
from tests.fake_host import FakeHost, request_for, running_workers
from workflows.models import rebuild_workflow_id
from workflows.rebuild import RebuildInstance


async def test_metrics_count_rebuilds_and_time_steps(dev_server: DevServer, unique_host: str) -> None:
    port = free_port()
    client: Client = await connect(dev_server.address, runtime=prometheus_runtime(f"127.0.0.1:{port}"))
    # The fake fails verify the first time only: the first rebuild rolls back, the second finishes.
    fake = FakeHost(fail_at="verify_instance")
    async with running_workers(client, unique_host, fake) as queue:
        for instance in ("vm-bad", "vm-ok"):
            handle = await client.start_workflow(
                RebuildInstance.run,
                request_for(unique_host, instance=instance),
                id=rebuild_workflow_id(unique_host, instance),
                task_queue=queue,
            )
            with contextlib.suppress(WorkflowFailureError):
                await handle.result()
    metrics = f"http://127.0.0.1:{port}/metrics"
    async with aiohttp.ClientSession() as session, session.get(metrics) as response:
        lines = (await response.text()).splitlines()

    def value(name: str) -> float:
        return sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith(name + "{"))

    assert value("rebuilds_started") == 2
    assert value("rebuilds_finished") == 1
    assert value("rebuilds_rolled_back") == 1
    assert any(line.startswith("rebuild_step_seconds") and 'step="prepare"' in line for line in lines)
    assert any(line.startswith("temporal_") for line in lines), "the SDK's own metrics are served too"
