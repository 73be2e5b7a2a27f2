"""InstanceInventory: every asked host's instances, each listed by that host's own worker.

One ``list_instances`` per host, all at once. A host whose worker is gone must not hold up the others:
its listing has a short schedule-to-start timeout (no retry helps a queue nobody polls), and the host is
reported as not answering.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, TimeoutError

with workflow.unsafe.imports_passed_through():
    from workflows import contract
    from workflows.activity_models import ListInstancesInput
    from workflows.inventory_models import INVENTORY_WORKFLOW, HostListing, InventoryReport, InventoryRequest
    from workflows.names import host_task_queue


@workflow.defn(name=INVENTORY_WORKFLOW)
class InstanceInventory:
    @workflow.run
    async def run(self, request: InventoryRequest) -> InventoryReport:
        listings = await asyncio.gather(*(self._list(host, request) for host in request.hosts))
        return InventoryReport(hosts=list(listings))

    async def _list(self, host: str, request: InventoryRequest) -> HostListing:
        within = timedelta(seconds=request.answer_within_seconds)
        try:
            listing = await contract.list_instances.start(
                ListInstancesInput(name_pattern=request.name_pattern),
                task_queue=host_task_queue(host),
                schedule_to_start_timeout=within,
                start_to_close_timeout=timedelta(seconds=30),
                retry_policy=RetryPolicy(maximum_attempts=2),
                summary=f"instances: {host}",
            )
        except ActivityError as err:
            if isinstance(err.cause, TimeoutError):
                note = f"no worker answered within {request.answer_within_seconds:g} s"
                return HostListing(host=host, error=note)
            return HostListing(host=host, error=f"listing failed: {err.cause or err}")
        # As data, not as objects: the sandbox may hold another copy of InventoryEntry's class.
        return HostListing(host=host, instances=[entry.model_dump() for entry in listing.instances])
