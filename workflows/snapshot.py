"""SnapshotInstance: copy an instance's root disk while it runs; SnapshotCatalog: a host's snapshots.

The copy is one activity on the instance's host (``activities/snapshots.py``): it freezes and thaws
the guest around the backup's begin and waits for the copy, heartbeating, so a dead worker is noticed
in seconds and the next attempt starts by undoing the last one's leftovers. When every attempt fails,
or the snapshot is cancelled, the undo runs until it succeeds: the guest thawed, the backup job
aborted, the partial file gone. The instance is never stopped.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

from temporalio import workflow
from temporalio.exceptions import ActivityError, CancelledError

with workflow.unsafe.imports_passed_through():
    from workflows import contract
    from workflows.names import host_task_queue
    from workflows.snapshot_models import (
        SNAPSHOT_CATALOG_WORKFLOW,
        SNAPSHOT_PUBLISH_WORKFLOW,
        SNAPSHOT_WORKFLOW,
        DiscardSnapshotInput,
        PruneSnapshotsInput,
        PublishedSnapshot,
        PublishRequest,
        PublishSnapshotInput,
        SnapshotCatalogRequest,
        SnapshotCatalogResult,
        SnapshotRecord,
        SnapshotRequest,
        TakeSnapshotInput,
    )
    from workflows.steps import CLEANUP, UNDO, StepOptions

SNAPSHOT_STATUS_QUERY = "status"
# The copy runs as long as the disk's bytes take; its heartbeat says it is alive.
COPY = StepOptions(start_to_close=timedelta(hours=6), heartbeat=timedelta(seconds=10), maximum_attempts=5)
CATALOG = StepOptions(start_to_close=timedelta(minutes=1), maximum_attempts=5)


@workflow.defn(name=SNAPSHOT_WORKFLOW)
class SnapshotInstance:
    def __init__(self) -> None:
        self._phase = "copy"

    @workflow.query(name=SNAPSHOT_STATUS_QUERY)
    def status(self) -> str:
        return self._phase

    @workflow.run
    async def run(self, request: SnapshotRequest) -> SnapshotRecord:
        queue = host_task_queue(request.host)
        # The workflow's first run names the snapshot: a retry of the copy writes the same record.
        snapshot_id = workflow.uuid4().hex
        take = TakeSnapshotInput(
            snapshot_id=snapshot_id,
            instance=request.instance,
            host=request.host,
            label=request.label,
            quiesce=request.quiesce,
        )
        try:
            record = await _run(contract.take_snapshot, take, queue, COPY)
        except (ActivityError, CancelledError, asyncio.CancelledError):
            self._phase = "discard"
            undo = DiscardSnapshotInput(snapshot_id=snapshot_id, instance=request.instance)
            await asyncio.shield(_run(contract.discard_snapshot, undo, queue, UNDO))
            raise
        if request.keep is not None:
            self._phase = "retention"
            prune = PruneSnapshotsInput(instance=request.instance, keep=request.keep)
            await _run(contract.prune_snapshots, prune, queue, CLEANUP)
        self._phase = "done"
        return record


@workflow.defn(name=SNAPSHOT_CATALOG_WORKFLOW)
class SnapshotCatalog:
    """One call on a host's snapshot records, which live on that host alone."""

    @workflow.run
    async def run(self, request: SnapshotCatalogRequest) -> SnapshotCatalogResult:
        return await _run(contract.snapshot_catalog, request, host_task_queue(request.host), CATALOG)


@workflow.defn(name=SNAPSHOT_PUBLISH_WORKFLOW)
class PublishSnapshot:
    """Upload a snapshot into the host worker's Glance, for other hosts to rebuild from."""

    @workflow.run
    async def run(self, request: PublishRequest) -> PublishedSnapshot:
        publish = PublishSnapshotInput(snapshot_id=request.snapshot_id, name=request.name)
        return await _run(contract.publish_snapshot, publish, host_task_queue(request.host), COPY)


async def _run(
    activity: contract.HostActivity[contract.In, contract.Out],
    argument: contract.In,
    queue: str,
    options: StepOptions,
) -> contract.Out:
    return await activity.start(
        argument,
        task_queue=queue,
        start_to_close_timeout=options.start_to_close,
        heartbeat_timeout=options.heartbeat,
        retry_policy=options.retry_policy(),
    )


# Every snapshot workflow a worker runs (and the replay test replays).
SNAPSHOT_WORKFLOWS = (SnapshotInstance, SnapshotCatalog, PublishSnapshot)
