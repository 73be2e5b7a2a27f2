"""The real SnapshotInstance workflow, and a rebuild from a snapshot, on the dev server with fake hosts.

What the workflow promises beyond its activity: a snapshot that fails or is cancelled is undone (the
guest thawed, the job aborted, the partial file gone) before the workflow ends; retention runs only
after a snapshot finished; a rebuild from a snapshot skips fetch but still checks the image.
"""

from __future__ import annotations

import asyncio

import pytest
from temporalio.client import Client, WorkflowFailureError, WorkflowHandle
from temporalio.exceptions import ActivityError, ApplicationError, CancelledError

from devtools.testbed.fake_host import SHA, FakeHost, request_for, running_workers
from starter.errors import Conflict
from starter.rebuilds import start_rebuild
from starter.snapshots import start_snapshot as start_snapshot_service
from tests.history_recorder import record_fleet_history, record_history
from tests.workflow_support import rebuilding
from workflows.models import Outcome
from workflows.snapshot import SnapshotInstance
from workflows.snapshot_models import SnapshotRecord, SnapshotRequest, snapshot_workflow_id

SNAPSHOT_ID = "c" * 32


async def start_snapshot(
    client: Client, queue: str, host: str, **request: object
) -> WorkflowHandle[SnapshotInstance, SnapshotRecord]:
    return await client.start_workflow(
        SnapshotInstance.run,
        SnapshotRequest(instance="vm-1", host=host, **request),
        id=snapshot_workflow_id(host, "vm-1"),
        task_queue=queue,
    )


async def test_a_snapshot_is_taken_then_older_ones_pruned(client: Client, unique_host: str) -> None:
    fake = FakeHost()
    async with running_workers(client, unique_host, fake) as queue:
        handle = await start_snapshot(client, queue, unique_host, keep=3, label="nightly")
        record = await handle.result()
        await record_fleet_history(handle, "snapshot-taken-then-pruned")
    assert fake.calls == ["take_snapshot", "prune_snapshots"]
    assert record.instance == "vm-1" and len(record.snapshot_id) == 32


@pytest.mark.parametrize("ending", ["fails", "cancelled"])
async def test_a_snapshot_that_does_not_finish_is_undone(
    client: Client, unique_host: str, ending: str
) -> None:
    fake = FakeHost(fail_at="take_snapshot" if ending == "fails" else None, error_type="QuiesceFailed")
    if ending == "cancelled":
        fake.hold("take_snapshot")
    async with running_workers(client, unique_host, fake) as queue:
        handle = await start_snapshot(client, queue, unique_host, keep=1)
        if ending == "cancelled":
            await asyncio.wait_for(fake.reached["take_snapshot"].wait(), 30)
            await handle.cancel()
        with pytest.raises(WorkflowFailureError) as caught:
            await handle.result()
        await record_fleet_history(handle, f"snapshot-{ending}-undone")
    assert fake.calls == ["take_snapshot", "discard_snapshot"], "undone, and no retention"
    cause = caught.value.cause
    if ending == "cancelled":
        assert isinstance(cause, CancelledError)
    else:
        assert isinstance(cause, ActivityError) and isinstance(cause.cause, ApplicationError)
        assert cause.cause.type == "QuiesceFailed"


async def test_a_rebuild_from_a_snapshot_skips_fetch_and_still_checks(
    client: Client, unique_host: str
) -> None:
    fake = FakeHost()
    request = {"image_url": None, "sha256": None, "snapshot_id": SNAPSHOT_ID}
    async with rebuilding(client, unique_host, fake, **request) as handle:
        result = await handle.result()
        await record_history(handle, "rebuild-from-snapshot")
    assert fake.calls[:3] == ["inspect_instance", "resolve_snapshot", "check_image"]
    assert "fetch_image" not in fake.calls
    assert result.outcome == Outcome.REBUILT
    assert result.image_sha256 == SHA
    assert result.image_url == f"snapshot:{SNAPSHOT_ID}"


def test_request_for_accepts_a_snapshot() -> None:
    assert request_for("h", image_url=None, snapshot_id=SNAPSHOT_ID).image_label == f"snapshot:{SNAPSHOT_ID}"


async def test_a_snapshot_and_a_rebuild_of_one_instance_never_run_at_once(
    client: Client, unique_host: str, fake_host: FakeHost
) -> None:
    fake_host.hold("fetch_image")
    rebuilding_handle = await start_rebuild(client, request_for(unique_host))
    await asyncio.wait_for(fake_host.reached["fetch_image"].wait(), 30)
    with pytest.raises(Conflict, match="being rebuilt"):
        await start_snapshot_service(client, SnapshotRequest(instance="vm-1", host=unique_host))
    fake_host.release("fetch_image")
    assert (await rebuilding_handle.result()).outcome == Outcome.REBUILT

    fake_host.hold("take_snapshot")
    snapshotting = await start_snapshot_service(client, SnapshotRequest(instance="vm-1", host=unique_host))
    await asyncio.wait_for(fake_host.reached["take_snapshot"].wait(), 30)
    with pytest.raises(Conflict, match="snapshot of vm-1"):
        await start_rebuild(client, request_for(unique_host))
    fake_host.release("take_snapshot")
    assert (await snapshotting.result()).instance == "vm-1"
