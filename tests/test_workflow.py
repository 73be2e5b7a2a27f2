"""The real RebuildInstance workflow on the real Temporal dev server, with fake host activities.

Its steps in order, the undos after a failure and the three endings, cleanup, and its wire models; its
controls (approve, confirm, revert, abort) are in tests/test_workflow_controls.py.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest
from pydantic import ValidationError
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.exceptions import ApplicationError, CancelledError, WorkflowAlreadyStartedError

from devtools.testbed.fake_host import SHA, FakeHost, request_for, running_workers
from tests.history_recorder import CLEAN_UP_IN_ONE_STEP, SWAP_IN_ONE_STEP, record_history
from tests.workflow_support import BEFORE_STOP, DISCARD, MAIN_PATH, failure_of, rebuilding, start
from workflows.models import (
    Outcome,
    Phase,
    RebuildRequest,
    RebuildResult,
    RebuildStatus,
    StopInstanceInput,
    StrictRebuildRequest,
    rebuild_workflow_id,
)
from workflows.rebuild import RebuildInstance


async def test_happy_path_runs_steps_in_order_and_reports_downtime(client: Client, unique_host: str) -> None:
    fake = FakeHost()
    async with rebuilding(client, unique_host, fake) as handle:
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


async def test_a_host_that_swaps_in_one_step_gets_no_round_trip_inside_the_downtime(
    client: Client, unique_host: str
) -> None:
    fake = FakeHost()
    fake.swaps_in_one_step = True
    async with rebuilding(client, unique_host, fake) as handle:
        result = await handle.result()
        await record_history(handle, "rebuild-swapped-in-one-step", SWAP_IN_ONE_STEP)
    one_step = ["stop_instance", "prepare_root_disk", "start_instance"]
    at = MAIN_PATH.index("stop_instance")
    assert fake.calls == [*MAIN_PATH[:at], "swap_root_disk", *MAIN_PATH[at + len(one_step) :]]
    assert result.outcome == Outcome.REBUILT
    assert result.downtime_seconds == pytest.approx(0.25)
    assert result.stopped_by == "forced"
    assert set(result.step_seconds) >= {"stop", "prepare", "start", "verify"}


async def test_a_host_that_cleans_up_in_one_step_removes_the_backup_and_records_the_image_at_once(
    client: Client, unique_host: str
) -> None:
    fake = FakeHost()
    fake.swaps_in_one_step = fake.cleans_up_in_one_step = True
    async with rebuilding(client, unique_host, fake) as handle:
        result = await handle.result()
        history = await handle.fetch_history()
        await record_history(handle, "rebuild-cleaned-up-in-one-step", CLEAN_UP_IN_ONE_STEP)
    assert fake.calls[-1] == "clean_up_rebuild"
    assert "remove_backup" not in fake.calls and "record_image" not in fake.calls
    assert result.outcome == Outcome.REBUILT
    assert "cleanup" in result.step_seconds
    scheduled = [e for e in history.events if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED]
    assert [e.activity_task_scheduled_event_attributes.activity_type.name for e in scheduled][-1] == (
        "clean_up_rebuild"
    )


@pytest.mark.parametrize("part", ["stop", "prepare", "start"])
async def test_one_step_swap_failing_rolls_back_like_the_three_steps_and_names_its_part(
    client: Client, unique_host: str, part: str
) -> None:
    fake = FakeHost(fail_at="swap_root_disk")
    fake.swaps_in_one_step, fake.swap_fails_in = True, part
    async with rebuilding(client, unique_host, fake) as handle:
        error, result = await failure_of(handle)
    done = fake.calls.index("swap_root_disk") + 1
    assert fake.calls[done:] == ["stop_instance", "restore_root_disk", "start_instance", DISCARD]
    assert error.type == "RebuildRolledBack"
    assert f"failed at {part}:" in error.message
    assert result.outcome == Outcome.ROLLED_BACK


@pytest.mark.parametrize(
    ("fail_at", "undone"),
    [
        ("stop_instance", ["start_instance", DISCARD]),
        ("prepare_root_disk", ["restore_root_disk", "start_instance", DISCARD]),
        ("start_instance", ["stop_instance", "restore_root_disk", "start_instance", DISCARD]),
        ("verify_instance", ["stop_instance", "restore_root_disk", "start_instance", DISCARD]),
    ],
)
async def test_failure_after_stop_runs_compensation_in_reverse(
    client: Client, unique_host: str, fail_at: str, undone: list[str]
) -> None:
    fake = FakeHost(fail_at=fail_at)
    async with rebuilding(client, unique_host, fake) as handle:
        error, result = await failure_of(handle)
        if fail_at == "verify_instance":
            await record_history(handle, "rebuild-rolled-back-at-verify")
    done = fake.calls.index(fail_at) + 1
    assert fake.calls[:done] == MAIN_PATH[: MAIN_PATH.index(fail_at) + 1]
    assert fake.calls[done:] == undone
    assert error.type == "RebuildRolledBack"
    assert "rolled back" in error.message
    assert f"{fail_at} failed on purpose" in error.message
    assert result.outcome == Outcome.ROLLED_BACK
    assert result.error_type == "InjectedFailure"
    assert len(result.undone) == len(undone)


@pytest.mark.parametrize("fail_at", BEFORE_STOP)
async def test_failure_before_stop_changes_nothing(client: Client, unique_host: str, fail_at: str) -> None:
    fake = FakeHost(fail_at=fail_at, error_type="ChecksumMismatch")
    async with rebuilding(client, unique_host, fake) as handle:
        error, result = await failure_of(handle)
    assert fake.calls == BEFORE_STOP[: BEFORE_STOP.index(fail_at) + 1]
    assert error.type == "RebuildFailed"
    assert "nothing was changed" in error.message
    assert result.outcome == Outcome.UNCHANGED
    assert result.error_type == "ChecksumMismatch"


async def test_a_failed_stage_drops_the_staged_disk_and_changes_nothing(
    client: Client, unique_host: str
) -> None:
    fake = FakeHost(fail_at="stage_root_disk", error_type="HostOutOfSpace")
    async with rebuilding(client, unique_host, fake) as handle:
        error, result = await failure_of(handle)
        await record_history(handle, "rebuild-failed-in-stage")
    assert fake.calls == [*BEFORE_STOP, "stage_root_disk", DISCARD]
    assert error.type == "RebuildFailed"
    assert "nothing was changed" in error.message
    assert result.outcome == Outcome.UNCHANGED
    assert result.undone == ["drop the staged disk"]


async def test_instance_that_was_off_stays_off(client: Client, unique_host: str) -> None:
    fake = FakeHost(was_running=False)
    async with rebuilding(client, unique_host, fake) as handle:
        result = await handle.result()
    assert "start_instance" not in fake.calls
    assert result.downtime_seconds is None


async def test_instance_that_was_off_is_not_started_by_rollback(client: Client, unique_host: str) -> None:
    fake = FakeHost(was_running=False, fail_at="prepare_root_disk")
    async with rebuilding(client, unique_host, fake) as handle:
        await failure_of(handle)
    assert fake.calls[-2:] == ["restore_root_disk", DISCARD]
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
    async with rebuilding(client, unique_host, fake, held="prepare_root_disk") as handle:
        await handle.cancel()
        _error, result = await failure_of(handle)
        status = await handle.query(RebuildInstance.status)
        await record_history(handle, "rebuild-cancelled-in-prepare")
    assert fake.calls[-3:] == ["restore_root_disk", "start_instance", DISCARD]
    assert result.outcome == Outcome.ROLLED_BACK
    assert result.error_type == "Cancelled"
    assert status.phase == Phase.ROLLED_BACK


async def test_cancel_before_stop_changes_nothing(client: Client, unique_host: str) -> None:
    fake = FakeHost()
    async with rebuilding(client, unique_host, fake, held="fetch_image") as handle:
        await handle.cancel()
        error, result = await failure_of(handle)
    assert fake.calls == ["inspect_instance", "fetch_image"]
    assert result.outcome == Outcome.UNCHANGED
    assert not isinstance(error, CancelledError)


async def test_search_attributes_follow_the_phase(client: Client, unique_host: str) -> None:
    fake = FakeHost()
    async with rebuilding(client, unique_host, fake, held="prepare_root_disk") as handle:
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

    async def enter(name: str) -> None:
        await original(name)
        if name == "restore_root_disk":
            raise ApplicationError("backup vanished", type="DiskMissing", non_retryable=True)

    fake._enter = enter  # type: ignore[method-assign]
    async with rebuilding(client, unique_host, fake) as handle:
        error, result = await failure_of(handle)
    assert error.type == "RollbackFailed"
    assert "backup vanished" in error.message
    assert result.outcome == Outcome.ROLLBACK_FAILED
    # The instance is not started again on top of a disk whose restore failed.
    assert fake.calls[-1] == "restore_root_disk"


async def test_cleanup_retries_without_limit_and_status_says_rebuilt_cleanup_pending(
    client: Client, unique_host: str
) -> None:
    fake = FakeHost()
    fake.flaky["remove_backup"] = 2
    async with rebuilding(client, unique_host, fake, held="record_image") as handle:
        status = await handle.query(RebuildInstance.status)
        fake.release("record_image")
        result = await handle.result()
        history = await handle.fetch_history()
    assert status.phase == Phase.CLEANUP
    assert status.summary == "rebuilt, cleanup pending"
    assert result.outcome == Outcome.REBUILT
    assert fake.calls.count("remove_backup") == 3
    cleanup_policies = [
        e.activity_task_scheduled_event_attributes.retry_policy.maximum_attempts
        for e in history.events
        if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED
        and e.activity_task_scheduled_event_attributes.activity_type.name in ("remove_backup", "record_image")
    ]
    assert cleanup_policies == [0, 0]  # 0: no limit, like the undos


async def test_a_cleanup_error_no_retry_fixes_is_reported_with_the_rebuilt_result(
    client: Client, unique_host: str
) -> None:
    fake = FakeHost(fail_at="remove_backup", error_type="InstanceNotFound")
    async with rebuilding(client, unique_host, fake) as handle:
        result = await handle.result()
        status = await handle.query(RebuildInstance.status)
        await record_history(handle, "rebuild-cleanup-failed-for-good")
    assert result.outcome == Outcome.REBUILT
    assert result.cleanup_error == "remove_backup failed on purpose"
    assert status.phase == Phase.DONE
    assert status.summary == "rebuilt; cleanup failed: remove_backup failed on purpose"


async def test_a_payload_from_a_newer_client_runs_on_this_worker(client: Client, unique_host: str) -> None:
    """Mixed versions: a field this code does not know yet is ignored, not a stuck workflow task."""
    fake = FakeHost()
    newer = request_for(unique_host).model_dump(mode="json") | {"verify_mode": "guest-agent"}
    async with running_workers(client, unique_host, fake) as queue:
        handle = await client.start_workflow(
            "RebuildInstance",
            newer,
            id=rebuild_workflow_id(unique_host, "vm-1"),
            task_queue=queue,
            result_type=RebuildResult,
            run_timeout=timedelta(seconds=30),
        )
        result = await handle.result()
    assert result.outcome == Outcome.REBUILT


def test_models_crossing_temporal_ignore_unknown_fields_and_the_edges_refuse_them() -> None:
    converter = pydantic_data_converter.payload_converter
    (payload,) = converter.to_payloads([{"instance": "vm-1", "timeout_seconds": 5, "use_guest_agent": True}])
    assert converter.from_payload(payload, StopInstanceInput) == StopInstanceInput(
        instance="vm-1", timeout_seconds=5
    )
    (payload,) = converter.to_payloads(
        [{"phase": "done", "instance": "a", "host": "h", "image_url": None, "x": 1}]
    )
    assert converter.from_payload(payload, RebuildStatus).phase == Phase.DONE
    # A validator tightened later must not break the replay of a request accepted earlier.
    assert RebuildRequest.model_validate({"instance": "vm 1", "host": "h", "image_url": "ftp://x"})
    with pytest.raises(ValidationError, match="extra_forbidden"):
        StrictRebuildRequest.model_validate(
            {"instance": "vm-1", "host": "h", "image_url": "http://i/x", "verify_mode": "x"}
        )
    with pytest.raises(ValidationError, match="not a usable instance name"):
        StrictRebuildRequest.model_validate({"instance": "vm 1", "host": "h", "image_url": "http://i/x"})


async def test_a_glance_image_is_resolved_before_the_download(client: Client, unique_host: str) -> None:
    fake = FakeHost()
    glance = {
        "glance_url": "http://glance.invalid:9292",
        "glance_image_id": "0b9f2f0e-5c6a-4a4e-9f57-2d7f9c1a0b11",
    }
    async with rebuilding(client, unique_host, fake, image_url=None, sha256=None, **glance) as handle:
        result = await handle.result()
        await record_history(handle, "rebuild-from-glance")
    assert fake.calls[:3] == ["inspect_instance", "resolve_glance_image", "fetch_image"]
    assert result.outcome == Outcome.REBUILT


async def test_status_lists_every_phase_entered_in_order_and_the_stop_s_graceful_deadline(
    client: Client, unique_host: str
) -> None:
    fake = FakeHost()
    async with rebuilding(client, unique_host, fake, held="stop_instance", stop_timeout_seconds=45) as handle:
        stopping = await handle.query(RebuildInstance.status)
        fake.release("stop_instance")
        await handle.result()
        ended = await handle.query(RebuildInstance.status)
    stop = stopping.phases[-1]
    assert (stopping.phase, stop.phase) == (Phase.STOP, Phase.STOP)
    assert stopping.graceful_stop_deadline == stop.at + timedelta(seconds=45)
    assert ended.graceful_stop_deadline is None
    assert [p.phase.value for p in ended.phases] == [
        "inspect", "fetch", "check", "stage", "stop", "prepare", "start", "verify", "cleanup", "done",
    ]  # fmt: skip
    times = [p.at for p in ended.phases]
    assert times == sorted(times) and ended.started_at is not None and times[0] >= ended.started_at
