"""The real RebuildInstance workflow on the real Temporal dev server, with fake host activities."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest
from pydantic import ValidationError
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client, WorkflowFailureError, WorkflowHandle
from temporalio.common import WorkflowIDConflictPolicy
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.exceptions import ApplicationError, CancelledError, WorkflowAlreadyStartedError

from tests.fake_host import SHA, FakeHost, request_for, running_workers
from tests.history_recorder import record_history
from workflows.models import (
    AbortRequest,
    Decision,
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
        await record_history(handle, "rebuild-cancelled-in-prepare")
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


async def wait_for_phase(handle: WorkflowHandle[RebuildInstance, RebuildResult], phase: Phase) -> None:
    for _ in range(200):
        if (await handle.query(RebuildInstance.status)).phase == phase:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"never reached phase {phase}")


async def test_approval_lets_the_rebuild_stop_the_instance(client: Client, unique_host: str) -> None:
    fake = FakeHost()
    async with running_workers(client, unique_host, fake) as queue:
        handle = await start(client, queue, request_for(unique_host, require_approval=True))
        await wait_for_phase(handle, Phase.AWAIT_APPROVAL)
        assert fake.calls == BEFORE_STOP
        await handle.signal(RebuildInstance.approve, Decision(requested_by="ops"))
        result = await handle.result()
        await record_history(handle, "rebuild-approved")
    assert result.outcome == Outcome.REBUILT
    assert fake.calls == MAIN_PATH
    assert "await-approval" in result.step_seconds


async def test_no_approval_in_time_changes_nothing(client: Client, unique_host: str) -> None:
    fake = FakeHost()
    async with running_workers(client, unique_host, fake) as queue:
        handle = await start(
            client, queue, request_for(unique_host, require_approval=True, approval_timeout_seconds=1)
        )
        with pytest.raises(WorkflowFailureError) as caught:
            await handle.result()
    error, result = rolled_back(caught.value)
    assert "no approval within 1 s" in error.message
    assert "nothing was changed" in error.message
    assert result.error_type == "ApprovalTimeout"
    assert fake.calls == BEFORE_STOP


@pytest.mark.parametrize("verdict", ["confirm", "revert"])
async def test_confirm_window_keeps_or_reverts(client: Client, unique_host: str, verdict: str) -> None:
    fake = FakeHost()
    async with running_workers(client, unique_host, fake) as queue:
        handle = await start(client, queue, request_for(unique_host, confirm_within_seconds=60))
        await wait_for_phase(handle, Phase.CONFIRM_WINDOW)
        assert "remove_backup" not in fake.calls  # the old disk waits as a backup
        signal = RebuildInstance.confirm if verdict == "confirm" else RebuildInstance.revert
        await handle.signal(signal, Decision(reason="looks wrong", requested_by="qa"))
        if verdict == "confirm":
            assert (await handle.result()).outcome == Outcome.REBUILT
            await record_history(handle, "rebuild-confirmed-in-confirm-window")
            assert fake.calls[-2:] == ["remove_backup", "record_image"]
            return
        with pytest.raises(WorkflowFailureError) as caught:
            await handle.result()
        await record_history(handle, "rebuild-reverted-in-confirm-window")
    error, result = rolled_back(caught.value)
    assert "reverted: looks wrong (by qa)" in error.message
    assert result.error_type == "Reverted"
    assert fake.calls[-3:] == ["stop_instance", "restore_root_disk", "start_instance"]


@pytest.mark.parametrize(("revert_by_default", "outcome"), [(False, "rebuilt"), (True, "rolled-back")])
async def test_confirm_window_end_decides_by_default(
    client: Client, unique_host: str, revert_by_default: bool, outcome: str
) -> None:
    fake = FakeHost()
    request = request_for(unique_host, confirm_within_seconds=1, revert_by_default=revert_by_default)
    async with running_workers(client, unique_host, fake) as queue:
        handle = await start(client, queue, request)
        try:
            got = (await handle.result()).outcome
        except WorkflowFailureError as failure:
            got = rolled_back(failure)[1].outcome
    assert got == outcome


async def test_signals_out_of_their_phase_are_ignored_with_a_reason(client: Client, unique_host: str) -> None:
    fake = FakeHost()
    fake.hold("prepare_root_disk")
    async with running_workers(client, unique_host, fake) as queue:
        handle = await start(client, queue, request_for(unique_host, confirm_within_seconds=60))
        await asyncio.wait_for(fake.reached["prepare_root_disk"].wait(), 10)
        await handle.signal(RebuildInstance.approve, Decision())
        await handle.signal(RebuildInstance.confirm, Decision())
        fake.release("prepare_root_disk")
        await wait_for_phase(handle, Phase.CONFIRM_WINDOW)
        await handle.signal(RebuildInstance.confirm, Decision())
        await handle.signal(RebuildInstance.revert, Decision())
        result = await handle.result()
        status = await handle.query(RebuildInstance.status)
    assert result.outcome == Outcome.REBUILT
    assert status.ignored_signals[:2] == [
        "approve in phase prepare ignored: this rebuild does not wait for approval",
        "confirm in phase prepare ignored: only meaningful in the confirm window",
    ]
    # The revert came after the confirm: still in the window (already decided) or past it.
    assert status.ignored_signals[2] in (
        "revert in phase confirm-window ignored: already decided: confirm",
        "revert in phase cleanup ignored: only meaningful in the confirm window",
        "revert in phase done ignored: only meaningful in the confirm window",
    )


PHASE_OF = {
    "inspect_instance": (Phase.INSPECT, Outcome.UNCHANGED),
    "fetch_image": (Phase.FETCH, Outcome.UNCHANGED),
    "check_image": (Phase.CHECK, Outcome.UNCHANGED),
    "stop_instance": (Phase.STOP, Outcome.ROLLED_BACK),
    "prepare_root_disk": (Phase.PREPARE, Outcome.ROLLED_BACK),
    "start_instance": (Phase.START, Outcome.ROLLED_BACK),
    "verify_instance": (Phase.VERIFY, Outcome.ROLLED_BACK),
    "remove_backup": (Phase.CLEANUP, Outcome.REBUILT),
}


@pytest.mark.parametrize("activity", list(PHASE_OF))
async def test_every_signal_in_every_phase(client: Client, unique_host: str, activity: str) -> None:
    """approve/confirm/revert mean nothing here and are recorded; abort is accepted until cleanup."""
    phase, outcome = PHASE_OF[activity]
    fake = FakeHost()
    fake.hold(activity)
    async with running_workers(client, unique_host, fake) as queue:
        handle = await start(client, queue, request_for(unique_host))
        await asyncio.wait_for(fake.reached[activity].wait(), 10)
        for signal in (RebuildInstance.approve, RebuildInstance.confirm, RebuildInstance.revert):
            await handle.signal(signal, Decision())
        answer = await handle.execute_update(RebuildInstance.abort_rebuild, AbortRequest(reason="now"))
        status = await handle.query(RebuildInstance.status)
        fake.release(activity)
        try:
            got = (await handle.result()).outcome
        except WorkflowFailureError as failure:
            got = rolled_back(failure)[1].outcome
        verb = "aborted" if answer.accepted else "abort-refused"
        await record_history(handle, f"rebuild-{verb}-in-{phase.value}")
    assert answer.phase == phase
    assert answer.accepted == (phase != Phase.CLEANUP)
    assert got == outcome
    ignored = [entry.split(" in phase ")[0] for entry in status.ignored_signals]
    assert ignored == ["approve", "confirm", "revert"] + ([] if answer.accepted else ["abort"])


async def test_cleanup_retries_without_limit_and_status_says_rebuilt_cleanup_pending(
    client: Client, unique_host: str
) -> None:
    fake = FakeHost()
    fake.flaky["remove_backup"] = 2
    fake.hold("record_image")
    async with running_workers(client, unique_host, fake) as queue:
        handle = await start(client, queue, request_for(unique_host))
        await asyncio.wait_for(fake.reached["record_image"].wait(), 30)
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
    async with running_workers(client, unique_host, fake) as queue:
        handle = await start(client, queue, request_for(unique_host))
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


@pytest.mark.parametrize(
    ("waiting", "phase", "outcome"),
    [
        ({"require_approval": True}, Phase.AWAIT_APPROVAL, Outcome.UNCHANGED),
        ({"confirm_within_seconds": 60}, Phase.CONFIRM_WINDOW, Outcome.ROLLED_BACK),
    ],
)
async def test_abort_while_waiting_for_a_person(
    client: Client, unique_host: str, waiting: dict[str, object], phase: Phase, outcome: Outcome
) -> None:
    fake = FakeHost()
    async with running_workers(client, unique_host, fake) as queue:
        handle = await start(client, queue, request_for(unique_host, **waiting))
        await wait_for_phase(handle, phase)
        await handle.signal(RebuildInstance.abort, AbortRequest(reason="not today"))
        with pytest.raises(WorkflowFailureError) as caught:
            await handle.result()
        await record_history(handle, f"rebuild-aborted-in-{phase.value}")
    assert rolled_back(caught.value)[1].outcome == outcome


async def test_a_glance_image_is_resolved_before_the_download(client: Client, unique_host: str) -> None:
    fake = FakeHost()
    request = request_for(
        unique_host,
        image_url=None,
        sha256=None,
        glance_url="http://glance.invalid:9292",
        glance_image_id="0b9f2f0e-5c6a-4a4e-9f57-2d7f9c1a0b11",
    )
    async with running_workers(client, unique_host, fake) as queue:
        handle = await start(client, queue, request)
        result = await handle.result()
        await record_history(handle, "rebuild-from-glance")
    assert fake.calls[:3] == ["inspect_instance", "resolve_glance_image", "fetch_image"]
    assert result.outcome == Outcome.REBUILT
