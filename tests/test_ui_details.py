"""What the Web UI and `status` show of a rebuild (issue 26, point 6): how it ended, how long the
instance was down, and until when it waits for approve, confirm or revert.

The Web UI reads a workflow's current details through the SDK's ``__temporal_workflow_metadata``
query; so does this test.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from temporalio.api.sdk.v1 import WorkflowMetadata
from temporalio.client import Client

from devtools.testbed.fake_host import FakeHost
from tests.workflow_support import failure_of, rebuilding, wait_for_phase
from workflows.models import Decision, Outcome, Phase
from workflows.rebuild import RebuildInstance


async def ui_details(handle: Any) -> str:
    metadata = await handle.query("__temporal_workflow_metadata", result_type=WorkflowMetadata)
    return str(metadata.current_details)


async def test_the_approval_deadline_is_shown_while_it_waits_and_the_outcome_once_rebuilt(
    client: Client, unique_host: str
) -> None:
    fake = FakeHost()
    async with rebuilding(
        client, unique_host, fake, require_approval=True, approval_timeout_seconds=7200
    ) as handle:
        await wait_for_phase(handle, Phase.AWAIT_APPROVAL)
        waiting = await handle.query(RebuildInstance.status)
        details = await ui_details(handle)
        await handle.signal(RebuildInstance.approve, Decision(requested_by="ops"))
        result = await handle.result()
        done = await handle.query(RebuildInstance.status)
        final = await ui_details(handle)
    assert waiting.approval_deadline is not None and waiting.started_at is not None
    # Two hours after the wait began, which was within seconds of the start.
    assert (
        timedelta(hours=2) <= waiting.approval_deadline - waiting.started_at < timedelta(hours=2, minutes=1)
    )
    assert f"waiting for approve until {waiting.approval_deadline:%Y-%m-%d %H:%M}" in details
    assert waiting.outcome is None and "outcome" not in details
    assert result.outcome == Outcome.REBUILT and result.downtime_seconds is not None
    assert done.outcome == Outcome.REBUILT
    assert done.downtime_seconds == result.downtime_seconds
    assert f"outcome: **rebuilt**, instance down {result.downtime_seconds:.2f} s" in final
    assert "waiting for" not in final


async def test_the_confirm_deadline_is_shown_and_a_revert_says_rolled_back(
    client: Client, unique_host: str
) -> None:
    fake = FakeHost()
    async with rebuilding(client, unique_host, fake, confirm_within_seconds=600) as handle:
        await wait_for_phase(handle, Phase.CONFIRM_WINDOW)
        waiting = await handle.query(RebuildInstance.status)
        details = await ui_details(handle)
        await handle.signal(RebuildInstance.revert, Decision(requested_by="ops", reason="broken app"))
        _, result = await failure_of(handle)
        final = await ui_details(handle)
        done = await handle.query(RebuildInstance.status)
    assert waiting.confirm_deadline is not None and waiting.started_at is not None
    assert timedelta(minutes=10) <= waiting.confirm_deadline - waiting.started_at < timedelta(minutes=11)
    assert f"until {waiting.confirm_deadline:%Y-%m-%d %H:%M}" in details and "then confirms" in details
    assert result.outcome == Outcome.ROLLED_BACK
    assert done.outcome == Outcome.ROLLED_BACK
    assert "outcome: **rolled back**" in final
