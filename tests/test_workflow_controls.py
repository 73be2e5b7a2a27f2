"""RebuildInstance's controls on the real dev server, with fake host activities: approve, confirm and
revert, abort as a signal and as an update, each accepted only in the phases where it means something.
"""

from __future__ import annotations

from typing import Any

import pytest
from temporalio.client import Client

from tests.fake_host import FakeHost
from tests.history_recorder import record_history
from tests.workflow_support import BEFORE_STOP, MAIN_PATH, failure_of, outcome_of, rebuilding, wait_for_phase
from workflows.models import AbortRequest, Decision, Outcome, Phase
from workflows.rebuild import RebuildInstance


async def test_abort_before_stop_changes_nothing(client: Client, unique_host: str) -> None:
    fake = FakeHost()
    async with rebuilding(client, unique_host, fake, held="fetch_image") as handle:
        answer = await handle.execute_update(
            RebuildInstance.abort_rebuild, AbortRequest(reason="wrong image", requested_by="ops")
        )
        error, result = await failure_of(handle)
    assert answer.accepted
    assert answer.phase == Phase.FETCH
    assert fake.calls == ["inspect_instance", "fetch_image"]
    assert "aborted: wrong image (by ops)" in error.message
    assert result.outcome == Outcome.UNCHANGED
    assert result.error_type == "Aborted"


async def test_abort_signal_after_stop_rolls_back(client: Client, unique_host: str) -> None:
    fake = FakeHost()
    async with rebuilding(client, unique_host, fake, held="start_instance") as handle:
        await handle.signal(RebuildInstance.abort, AbortRequest(reason="maintenance window closed"))
        _, result = await failure_of(handle)
    assert fake.calls[-3:] == ["stop_instance", "restore_root_disk", "start_instance"]
    assert result.outcome == Outcome.ROLLED_BACK
    assert result.error_type == "Aborted"


async def test_abort_during_cleanup_is_refused_and_recorded(client: Client, unique_host: str) -> None:
    fake = FakeHost()
    async with rebuilding(client, unique_host, fake, held="remove_backup") as handle:
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


async def test_approval_lets_the_rebuild_stop_the_instance(client: Client, unique_host: str) -> None:
    fake = FakeHost()
    async with rebuilding(client, unique_host, fake, require_approval=True) as handle:
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
    async with rebuilding(
        client, unique_host, fake, require_approval=True, approval_timeout_seconds=1
    ) as handle:
        error, result = await failure_of(handle)
    assert "no approval within 1 s" in error.message
    assert "nothing was changed" in error.message
    assert result.error_type == "ApprovalTimeout"
    assert fake.calls == BEFORE_STOP


@pytest.mark.parametrize("verdict", ["confirm", "revert"])
async def test_confirm_window_keeps_or_reverts(client: Client, unique_host: str, verdict: str) -> None:
    fake = FakeHost()
    async with rebuilding(client, unique_host, fake, confirm_within_seconds=60) as handle:
        await wait_for_phase(handle, Phase.CONFIRM_WINDOW)
        assert "remove_backup" not in fake.calls  # the old disk waits as a backup
        signal = RebuildInstance.confirm if verdict == "confirm" else RebuildInstance.revert
        await handle.signal(signal, Decision(reason="looks wrong", requested_by="qa"))
        if verdict == "confirm":
            assert (await handle.result()).outcome == Outcome.REBUILT
            await record_history(handle, "rebuild-confirmed-in-confirm-window")
            assert fake.calls[-2:] == ["remove_backup", "record_image"]
            return
        error, result = await failure_of(handle)
        await record_history(handle, "rebuild-reverted-in-confirm-window")
    assert "reverted: looks wrong (by qa)" in error.message
    assert result.error_type == "Reverted"
    assert fake.calls[-3:] == ["stop_instance", "restore_root_disk", "start_instance"]


@pytest.mark.parametrize(("revert_by_default", "outcome"), [(False, "rebuilt"), (True, "rolled-back")])
async def test_confirm_window_end_decides_by_default(
    client: Client, unique_host: str, revert_by_default: bool, outcome: str
) -> None:
    fake = FakeHost()
    window: dict[str, Any] = {"confirm_within_seconds": 1, "revert_by_default": revert_by_default}
    async with rebuilding(client, unique_host, fake, **window) as handle:
        assert await outcome_of(handle) == outcome


async def test_signals_out_of_their_phase_are_ignored_with_a_reason(client: Client, unique_host: str) -> None:
    fake = FakeHost()
    async with rebuilding(
        client, unique_host, fake, "prepare_root_disk", confirm_within_seconds=60
    ) as handle:
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
    async with rebuilding(client, unique_host, fake, held=activity) as handle:
        for signal in (RebuildInstance.approve, RebuildInstance.confirm, RebuildInstance.revert):
            await handle.signal(signal, Decision())
        answer = await handle.execute_update(RebuildInstance.abort_rebuild, AbortRequest(reason="now"))
        status = await handle.query(RebuildInstance.status)
        fake.release(activity)
        got = await outcome_of(handle)
        verb = "aborted" if answer.accepted else "abort-refused"
        await record_history(handle, f"rebuild-{verb}-in-{phase.value}")
    assert answer.phase == phase
    assert answer.accepted == (phase != Phase.CLEANUP)
    assert got == outcome
    ignored = [entry.split(" in phase ")[0] for entry in status.ignored_signals]
    assert ignored == ["approve", "confirm", "revert"] + ([] if answer.accepted else ["abort"])


@pytest.mark.parametrize(
    ("waiting", "phase", "outcome"),
    [
        ({"require_approval": True}, Phase.AWAIT_APPROVAL, Outcome.UNCHANGED),
        ({"confirm_within_seconds": 60}, Phase.CONFIRM_WINDOW, Outcome.ROLLED_BACK),
    ],
)
async def test_abort_while_waiting_for_a_person(
    client: Client, unique_host: str, waiting: dict[str, Any], phase: Phase, outcome: Outcome
) -> None:
    fake = FakeHost()
    async with rebuilding(client, unique_host, fake, **waiting) as handle:
        await wait_for_phase(handle, phase)
        await handle.signal(RebuildInstance.abort, AbortRequest(reason="not today"))
        _, result = await failure_of(handle)
        await record_history(handle, f"rebuild-aborted-in-{phase.value}")
    assert result.outcome == outcome
