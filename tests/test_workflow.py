"""The real RebuildInstance workflow on the real Temporal dev server, with fake host activities."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client, WorkflowFailureError, WorkflowHandle
from temporalio.common import WorkflowIDConflictPolicy
from temporalio.exceptions import ApplicationError, CancelledError, WorkflowAlreadyStartedError

from tests.fake_host import SHA, FakeHost, request_for, running_workers
from workflows.models import (
    AbortRequest,
    Outcome,
    Phase,
    RebuildRequest,
    RebuildResult,
    rebuild_workflow_id,
)
from workflows.rebuild import RebuildInstance

HISTORIES = Path(__file__).parent / "histories"
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


async def start(
    client: Client, queue: str, request: RebuildRequest
) -> WorkflowHandle[RebuildInstance, RebuildResult]:
    return await client.start_workflow(
        RebuildInstance.run,
        request,
        id=rebuild_workflow_id(request.host, request.instance),
        task_queue=queue,
        id_conflict_policy=WorkflowIDConflictPolicy.FAIL,
    )


async def record_history(handle: WorkflowHandle[RebuildInstance, RebuildResult], name: str) -> None:
    """Save the history for the replay test when asked to (REBUILD_RECORD_HISTORIES=1)."""
    if os.environ.get("REBUILD_RECORD_HISTORIES") != "1":
        return
    history = await handle.fetch_history()
    HISTORIES.mkdir(exist_ok=True)
    (HISTORIES / f"{name}.json").write_text(json.dumps(json.loads(history.to_json()), indent=1))


def rolled_back(failure: WorkflowFailureError) -> tuple[ApplicationError, RebuildResult]:
    cause = failure.cause
    assert isinstance(cause, ApplicationError)
    return cause, RebuildResult.model_validate(cause.details[0])


async def test_happy_path_runs_steps_in_order_and_reports_downtime(client: Client, unique_host: str) -> None:
    fake = FakeHost()
    async with running_workers(client, unique_host, fake) as queue:
        handle = await start(client, queue, request_for(unique_host))
        result = await handle.result()
        status = await handle.query(RebuildInstance.status)
        await record_history(handle, "rebuild-happy-path")
    assert fake.calls == MAIN_PATH
    assert result.outcome == Outcome.REBUILT
    assert result.image_sha256 == SHA
    assert result.downtime_seconds == pytest.approx(0.5)
    assert set(result.step_seconds) >= {"inspect", "fetch", "check", "stop", "prepare", "start", "verify"}
    assert status.phase == Phase.DONE
    assert status.undo_stack == []


@pytest.mark.parametrize(
    ("fail_at", "undone"),
    [
        ("stop_instance", ["start_instance"]),
        ("prepare_root_disk", ["restore_root_disk", "start_instance"]),
        ("start_instance", ["stop_instance", "restore_root_disk", "start_instance"]),
        ("verify_instance", ["stop_instance", "restore_root_disk", "start_instance"]),
    ],
)
async def test_failure_after_stop_runs_compensation_in_reverse(
    client: Client, unique_host: str, fail_at: str, undone: list[str]
) -> None:
    fake = FakeHost(fail_at=fail_at)
    async with running_workers(client, unique_host, fake) as queue:
        handle = await start(client, queue, request_for(unique_host))
        with pytest.raises(WorkflowFailureError) as caught:
            await handle.result()
        if fail_at == "verify_instance":
            await record_history(handle, "rebuild-rolled-back-at-verify")
    done = fake.calls.index(fail_at) + 1
    assert fake.calls[:done] == MAIN_PATH[: MAIN_PATH.index(fail_at) + 1]
    assert fake.calls[done:] == undone
    error, result = rolled_back(caught.value)
    assert error.type == "RebuildRolledBack"
    assert "rolled back" in error.message
    assert f"{fail_at} failed on purpose" in error.message
    assert result.outcome == Outcome.ROLLED_BACK
    assert result.error_type == "InjectedFailure"
    assert len(result.undone) == len(undone)


@pytest.mark.parametrize("fail_at", BEFORE_STOP)
async def test_failure_before_stop_changes_nothing(client: Client, unique_host: str, fail_at: str) -> None:
    fake = FakeHost(fail_at=fail_at, error_type="ChecksumMismatch")
    async with running_workers(client, unique_host, fake) as queue:
        handle = await start(client, queue, request_for(unique_host))
        with pytest.raises(WorkflowFailureError) as caught:
            await handle.result()
    assert fake.calls == BEFORE_STOP[: BEFORE_STOP.index(fail_at) + 1]
    error, result = rolled_back(caught.value)
    assert error.type == "RebuildFailed"
    assert "nothing was changed" in error.message
    assert result.outcome == Outcome.UNCHANGED
    assert result.error_type == "ChecksumMismatch"


async def test_instance_that_was_off_stays_off(client: Client, unique_host: str) -> None:
    fake = FakeHost(was_running=False)
    async with running_workers(client, unique_host, fake) as queue:
        result = await (await start(client, queue, request_for(unique_host))).result()
    assert "start_instance" not in fake.calls
    assert result.downtime_seconds is None


async def test_instance_that_was_off_is_not_started_by_rollback(client: Client, unique_host: str) -> None:
    fake = FakeHost(was_running=False, fail_at="prepare_root_disk")
    async with running_workers(client, unique_host, fake) as queue:
        handle = await start(client, queue, request_for(unique_host))
        with pytest.raises(WorkflowFailureError):
            await handle.result()
    assert fake.calls[-1] == "restore_root_disk"
    assert "start_instance" not in fake.calls


async def test_second_rebuild_of_the_same_instance_is_refused(client: Client, unique_host: str) -> None:
    fake = FakeHost()
    fake.hold("fetch_image")
    async with running_workers(client, unique_host, fake) as queue:
        handle = await start(client, queue, request_for(unique_host))
        await asyncio.wait_for(fake.reached["fetch_image"].wait(), 10)
        with pytest.raises(WorkflowAlreadyStartedError):
            await start(client, queue, request_for(unique_host, image_url="http://images.invalid/other"))
        status = await handle.query(RebuildInstance.status)
        assert status.phase == Phase.FETCH
        fake.release("fetch_image")
        assert (await handle.result()).outcome == Outcome.REBUILT


async def test_cancel_after_stop_restores_and_restarts(client: Client, unique_host: str) -> None:
    fake = FakeHost()
    fake.hold("prepare_root_disk")
    async with running_workers(client, unique_host, fake) as queue:
        handle = await start(client, queue, request_for(unique_host))
        await asyncio.wait_for(fake.reached["prepare_root_disk"].wait(), 10)
        await handle.cancel()
        with pytest.raises(WorkflowFailureError) as caught:
            await handle.result()
        status = await handle.query(RebuildInstance.status)
    assert fake.calls[-2:] == ["restore_root_disk", "start_instance"]
    _error, result = rolled_back(caught.value)
    assert result.outcome == Outcome.ROLLED_BACK
    assert result.error_type == "Cancelled"
    assert status.phase == Phase.ROLLED_BACK


async def test_cancel_before_stop_changes_nothing(client: Client, unique_host: str) -> None:
    fake = FakeHost()
    fake.hold("fetch_image")
    async with running_workers(client, unique_host, fake) as queue:
        handle = await start(client, queue, request_for(unique_host))
        await asyncio.wait_for(fake.reached["fetch_image"].wait(), 10)
        await handle.cancel()
        with pytest.raises(WorkflowFailureError) as caught:
            await handle.result()
    assert fake.calls == ["inspect_instance", "fetch_image"]
    error, result = rolled_back(caught.value)
    assert result.outcome == Outcome.UNCHANGED
    assert not isinstance(error, CancelledError)


async def test_search_attributes_follow_the_phase(client: Client, unique_host: str) -> None:
    fake = FakeHost()
    fake.hold("prepare_root_disk")
    async with running_workers(client, unique_host, fake) as queue:
        handle = await start(client, queue, request_for(unique_host))
        await asyncio.wait_for(fake.reached["prepare_root_disk"].wait(), 10)
        description = await handle.describe()
        phase = description.typed_search_attributes
        fake.release("prepare_root_disk")
        await handle.result()
        history = await handle.fetch_history()
    values = {pair.key.name: pair.value for pair in phase}
    assert values.get("RebuildPhase") == "prepare"
    upserts = [
        e for e in history.events if e.event_type == EventType.EVENT_TYPE_UPSERT_WORKFLOW_SEARCH_ATTRIBUTES
    ]
    assert len(upserts) >= 8


async def test_a_rollback_that_fails_for_good_says_so(client: Client, unique_host: str) -> None:
    fake = FakeHost(fail_at="verify_instance")
    original = fake._enter
    async with running_workers(client, unique_host, fake) as queue:

        async def enter(name: str) -> None:
            await original(name)
            if name == "restore_root_disk":
                raise ApplicationError("backup vanished", type="DiskMissing", non_retryable=True)

        fake._enter = enter  # type: ignore[method-assign]
        handle = await start(client, queue, request_for(unique_host))
        with pytest.raises(WorkflowFailureError) as caught:
            await handle.result()
    error, result = rolled_back(caught.value)
    assert error.type == "RollbackFailed"
    assert "backup vanished" in error.message
    assert result.outcome == Outcome.ROLLBACK_FAILED
    # The instance is not started again on top of a disk whose restore failed.
    assert fake.calls[-1] == "restore_root_disk"


async def test_abort_before_stop_changes_nothing(client: Client, unique_host: str) -> None:
    fake = FakeHost()
    fake.hold("fetch_image")
    async with running_workers(client, unique_host, fake) as queue:
        handle = await start(client, queue, request_for(unique_host))
        await asyncio.wait_for(fake.reached["fetch_image"].wait(), 10)
        answer = await handle.execute_update(
            RebuildInstance.abort_rebuild, AbortRequest(reason="wrong image", requested_by="ops")
        )
        with pytest.raises(WorkflowFailureError) as caught:
            await handle.result()
    assert answer.accepted
    assert answer.phase == Phase.FETCH
    assert fake.calls == ["inspect_instance", "fetch_image"]
    error, result = rolled_back(caught.value)
    assert "aborted: wrong image (by ops)" in error.message
    assert result.outcome == Outcome.UNCHANGED
    assert result.error_type == "Aborted"


async def test_abort_signal_after_stop_rolls_back(client: Client, unique_host: str) -> None:
    fake = FakeHost()
    fake.hold("start_instance")
    async with running_workers(client, unique_host, fake) as queue:
        handle = await start(client, queue, request_for(unique_host))
        await asyncio.wait_for(fake.reached["start_instance"].wait(), 10)
        await handle.signal(RebuildInstance.abort, AbortRequest(reason="maintenance window closed"))
        with pytest.raises(WorkflowFailureError) as caught:
            await handle.result()
    assert fake.calls[-3:] == ["stop_instance", "restore_root_disk", "start_instance"]
    _, result = rolled_back(caught.value)
    assert result.outcome == Outcome.ROLLED_BACK
    assert result.error_type == "Aborted"


async def test_abort_during_cleanup_is_refused_and_recorded(client: Client, unique_host: str) -> None:
    fake = FakeHost()
    fake.hold("remove_backup")
    async with running_workers(client, unique_host, fake) as queue:
        handle = await start(client, queue, request_for(unique_host))
        await asyncio.wait_for(fake.reached["remove_backup"].wait(), 10)
        answer = await handle.execute_update(RebuildInstance.abort_rebuild, AbortRequest(reason="too late"))
        await handle.signal(RebuildInstance.abort, AbortRequest(reason="again"))
        fake.release("remove_backup")
        result = await handle.result()
        status = await handle.query(RebuildInstance.status)
    assert not answer.accepted
    assert "too late to abort in phase cleanup" in answer.message
    assert result.outcome == Outcome.REBUILT
    assert len(status.ignored_signals) == 2
    assert status.abort_reason is None
