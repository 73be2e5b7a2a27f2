"""The rebuild service inside one bench run: the dev server, the workflow's worker and one host's worker."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.worker import Worker

from devtools.temporal_dev import DevServer, free_port
from devtools.testbed.e2e import LIBVIRT_URI, LOOPBACK_NETWORKS
from worker import WorkerConfig, host_activities
from workflows.models import host_task_queue
from workflows.rebuild import RebuildInstance

# The queue the benches start their rebuilds on and their workflow worker polls.
WORKFLOW_QUEUE = "bench-wf"


@asynccontextmanager
async def rebuild_service(workdir: Path, host: str, state_dir: Path) -> AsyncIterator[Client]:
    """A client of a fresh dev server in ``workdir``, with both workers running until the block ends."""
    server = DevServer(workdir / "t.db", free_port(), free_port(), workdir / "t.log")
    server.start()
    try:
        client = await Client.connect(server.address, data_converter=pydantic_data_converter)
        config = WorkerConfig(
            host=host,
            libvirt_uri=LIBVIRT_URI,
            state_dir=state_dir,
            allowed_image_networks=LOOPBACK_NETWORKS,
        )
        async with (
            Worker(client, task_queue=WORKFLOW_QUEUE, workflows=[RebuildInstance]),
            Worker(client, task_queue=host_task_queue(host), activities=host_activities(config)),
        ):
            yield client
    finally:
        server.stop()
