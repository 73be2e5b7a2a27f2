"""A process that runs only workflows (the fleet and its children) on one queue: a test kills it.

python -m tests.workflow_worker ADDRESS TASK_QUEUE
"""

from __future__ import annotations

import asyncio
import sys

from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.worker import Worker

from workflows.fleet import FleetRebuild
from workflows.rebuild import RebuildInstance


async def main(address: str, queue: str) -> None:
    client = await Client.connect(address, data_converter=pydantic_data_converter)
    async with Worker(client, task_queue=queue, workflows=[FleetRebuild, RebuildInstance]):
        print("workflow worker ready", flush=True)
        await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
