"""What operators and services do with rebuilds, once: start, describe, list, signal, abort.

The CLI and the HTTP API both call these and only translate the outcome (exit codes, HTTP statuses).
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

from pydantic import BaseModel, ValidationError
from temporalio.client import Client, WorkflowExecutionStatus, WorkflowHandle
from temporalio.common import (
    SearchAttributePair,
    TypedSearchAttributes,
    WorkflowIDConflictPolicy,
    WorkflowIDReusePolicy,
)
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode

from workflows import search_attributes as sa
from workflows.models import (
    WORKFLOW_TASK_QUEUE,
    AbortAnswer,
    AbortRequest,
    Decision,
    FetchProgress,
    RebuildRequest,
    RebuildStatus,
    check_requested_by,
    legacy_rebuild_workflow_id,
    rebuild_workflow_id,
)
from workflows.rebuild import RebuildInstance

DECISIONS = ("approve", "confirm", "revert")
_FILTER_VALUE = re.compile(r"^[A-Za-z0-9_.:-]+$")


class RebuildAlreadyRunning(Exception):
    def __init__(self, request: RebuildRequest) -> None:
        workflow_id = rebuild_workflow_id(request.host, request.instance)
        super().__init__(
            f"a rebuild of {request.instance} on {request.host} is already running "
            f"(workflow {workflow_id}); see: rebuild status {request.instance} --host {request.host}"
        )


class UnknownRebuild(Exception):
    def __init__(self, instance: str, host: str) -> None:
        super().__init__(f"no rebuild of {instance} on {host} is known")


class RebuildNotRunning(Exception):
    def __init__(self, instance: str, host: str) -> None:
        super().__init__(f"no rebuild of {instance} on {host} is running")


class BadFilter(Exception):
    pass


def validation_problems(exc: ValidationError) -> str:
    """One line naming each bad field and why, for operators and API callers alike."""
    return "; ".join(
        (f"{'.'.join(map(str, e['loc']))}: " if e["loc"] else "") + e["msg"].removeprefix("Value error, ")
        for e in exc.errors()
    )


class PendingActivity(BaseModel):
    activity: str
    attempt: int
    last_error: str | None = None
    # From the download's last heartbeat: bytes so far and the image's size, when known.
    progress_bytes: int | None = None
    total_bytes: int | None = None


class RebuildDescription(BaseModel):
    workflow_id: str
    workflow_status: str
    status: RebuildStatus | None = None
    pending_activities: list[PendingActivity] = []


class RebuildSummary(BaseModel):
    workflow_id: str
    instance: str | None
    host: str | None
    phase: str | None
    status: str | None
    started: str


async def start_rebuild(client: Client, request: RebuildRequest) -> WorkflowHandle[Any, Any]:
    """Start the workflow; one per instance at a time, so a second start is refused."""
    check_requested_by(request.requested_by)
    if await _running(client.get_workflow_handle(legacy_rebuild_workflow_id(request.host, request.instance))):
        # Started by an older version under the legacy ID: still the instance's one rebuild.
        raise RebuildAlreadyRunning(request)
    try:
        return await client.start_workflow(
            RebuildInstance.run,
            request,
            id=rebuild_workflow_id(request.host, request.instance),
            task_queue=WORKFLOW_TASK_QUEUE,
            id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE,
            id_conflict_policy=WorkflowIDConflictPolicy.FAIL,
            search_attributes=TypedSearchAttributes(
                [
                    SearchAttributePair(sa.INSTANCE_ID, request.instance),
                    SearchAttributePair(sa.HYPERVISOR_HOST, request.host),
                    SearchAttributePair(sa.IMAGE_ID, request.sha256 or request.image_label),
                    SearchAttributePair(sa.REBUILD_PHASE, "pending"),
                ]
            ),
            static_summary=f"Rebuild {request.instance} on {request.host}",
            static_details=(
                f"instance: {request.instance}\n\nhost: {request.host}\n\n"
                f"image: {request.image_label}\n\nsha256: {request.sha256 or '(computed)'}\n\n"
                f"requested by: {request.requested_by}"
            ),
        )
    except WorkflowAlreadyStartedError:
        raise RebuildAlreadyRunning(request) from None


async def latest_rebuild(
    client: Client, instance: str, host: str, must_run: bool = False
) -> tuple[WorkflowHandle[Any, Any], Any]:
    """The instance's latest rebuild and its description (under the legacy ID if only that exists)."""
    for workflow_id in (rebuild_workflow_id(host, instance), legacy_rebuild_workflow_id(host, instance)):
        handle = client.get_workflow_handle(workflow_id)
        try:
            description = await handle.describe()
            break
        except RPCError as exc:
            if exc.status != RPCStatusCode.NOT_FOUND:
                raise
    else:
        raise UnknownRebuild(instance, host)
    if must_run and description.status != WorkflowExecutionStatus.RUNNING:
        raise RebuildNotRunning(instance, host)
    return handle, description


async def _running(handle: WorkflowHandle[Any, Any]) -> bool:
    try:
        return (await handle.describe()).status == WorkflowExecutionStatus.RUNNING
    except RPCError as exc:
        if exc.status == RPCStatusCode.NOT_FOUND:
            return False
        raise


async def describe_rebuild(client: Client, instance: str, host: str) -> RebuildDescription:
    """Phase and timings from the workflow; attempts and last errors of running steps from Temporal."""
    handle, description = await latest_rebuild(client, instance, host)
    try:
        status: RebuildStatus | None = await asyncio.wait_for(handle.query(RebuildInstance.status), 5)
    except (RPCError, TimeoutError):
        status = None
    pending = []
    for p in description.raw_description.pending_activities:
        progress = await _fetch_progress(client, p)
        pending.append(
            PendingActivity(
                activity=p.activity_type.name,
                attempt=p.attempt,
                last_error=p.last_failure.message if p.HasField("last_failure") else None,
                progress_bytes=progress.offset if progress else None,
                total_bytes=progress.total if progress else None,
            )
        )
    return RebuildDescription(
        workflow_id=handle.id,
        workflow_status=description.status.name if description.status else "UNKNOWN",
        status=status,
        pending_activities=pending,
    )


async def _fetch_progress(client: Client, pending: Any) -> FetchProgress | None:
    if pending.activity_type.name != "fetch_image" or not pending.heartbeat_details.payloads:
        return None
    try:
        (progress,) = await client.data_converter.decode(pending.heartbeat_details.payloads, [FetchProgress])
    except Exception:
        return None
    return progress if isinstance(progress, FetchProgress) else None


def list_query(phase: str | None, host: str | None, running: bool) -> str:
    """A visibility query over the project's search attributes; values are checked, not quoted."""
    clauses = ["WorkflowType = 'RebuildInstance'"]
    for key, value in ((sa.REBUILD_PHASE, phase), (sa.HYPERVISOR_HOST, host)):
        if value is not None:
            if not _FILTER_VALUE.match(value):
                raise BadFilter(f"not a usable filter value: {value!r}")
            clauses.append(f"{key.name} = '{value}'")
    if running:
        clauses.append("ExecutionStatus = 'Running'")
    return " AND ".join(clauses)


async def list_rebuilds(client: Client, query: str, limit: int) -> list[RebuildSummary]:
    rows = []
    async for execution in client.list_workflows(query, limit=limit):
        attributes = {pair.key.name: pair.value for pair in execution.typed_search_attributes}
        rows.append(
            RebuildSummary(
                workflow_id=execution.id,
                instance=attributes.get(sa.INSTANCE_ID.name),
                host=attributes.get(sa.HYPERVISOR_HOST.name),
                phase=attributes.get(sa.REBUILD_PHASE.name),
                status=execution.status.name if execution.status else None,
                started=execution.start_time.isoformat(),
            )
        )
    return rows


async def send_decision(client: Client, instance: str, host: str, verdict: str, decision: Decision) -> str:
    """approve, confirm or revert; the workflow records one that makes no sense in its phase."""
    if verdict not in DECISIONS:
        raise ValueError(verdict)
    check_requested_by(decision.requested_by)
    handle, _ = await latest_rebuild(client, instance, host, must_run=True)
    await handle.signal(verdict, decision)
    return handle.id


async def abort_rebuild(client: Client, instance: str, host: str, request: AbortRequest) -> AbortAnswer:
    check_requested_by(request.requested_by)
    handle, _ = await latest_rebuild(client, instance, host, must_run=True)
    answer: AbortAnswer = await handle.execute_update(RebuildInstance.abort_rebuild, request)
    return answer
