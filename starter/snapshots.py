"""Snapshots, as the CLI and the API ask for them: start one, list, delete (shared service layer).

A snapshot's copy runs on the instance's host (``SnapshotInstance``), and its record lives there:
listing and deleting go to that host's worker too, through a one-activity ``SnapshotCatalog`` run.
"""

from __future__ import annotations

import uuid
from typing import Any

from temporalio.client import Client, WorkflowFailureError, WorkflowHandle
from temporalio.common import WorkflowIDConflictPolicy, WorkflowIDReusePolicy
from temporalio.exceptions import ApplicationError, WorkflowAlreadyStartedError

from starter.errors import BadRequest, Conflict, NotFound
from starter.rebuilds import check_host_has_worker, is_running
from workflows.models import WORKFLOW_TASK_QUEUE, rebuild_workflow_id
from workflows.snapshot_models import (
    SNAPSHOT_CATALOG_WORKFLOW,
    SNAPSHOT_PUBLISH_WORKFLOW,
    SNAPSHOT_WORKFLOW,
    PublishedSnapshot,
    PublishRequest,
    SnapshotCatalogRequest,
    SnapshotCatalogResult,
    SnapshotRecord,
    SnapshotRequest,
    snapshot_workflow_id,
)
from workflows.ui_text import escape_markdown

# What a snapshot's failure means for the caller: bad input (exit 2, HTTP 400/404), or a failure.
_NOT_FOUND = {"InstanceNotFound", "SnapshotNotFound"}
_BAD_INPUT = {"InvalidRequest", "QuiesceFailed", "HostOutOfSpace", "UnsupportedInstance"}


class SnapshotAlreadyRunning(Conflict):
    def __init__(self, instance: str, host: str) -> None:
        super().__init__(f"a snapshot of {instance} on {host} is already running")


class SnapshotRefused(BadRequest): ...


class SnapshotMissing(NotFound): ...


async def start_snapshot(client: Client, request: SnapshotRequest) -> WorkflowHandle[Any, SnapshotRecord]:
    """Refused while the instance is being rebuilt: its disk may be between the old and the new one."""
    await check_host_has_worker(client, request.host)
    if await is_running(client.get_workflow_handle(rebuild_workflow_id(request.host, request.instance))):
        raise Conflict(f"{request.instance} on {request.host} is being rebuilt: snapshot it after")
    try:
        return await client.start_workflow(
            SNAPSHOT_WORKFLOW,
            request,
            result_type=SnapshotRecord,
            id=snapshot_workflow_id(request.host, request.instance),
            task_queue=WORKFLOW_TASK_QUEUE,
            id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE,
            id_conflict_policy=WorkflowIDConflictPolicy.FAIL,
            static_summary=escape_markdown(f"Snapshot {request.instance} on {request.host}"),
            static_details=escape_markdown(
                f"instance: {request.instance}\n\nhost: {request.host}\n\nlabel: {request.label or '-'}\n\n"
                f"requested by: {request.requested_by}",
                keep_paragraphs=True,
            ),
        )
    except WorkflowAlreadyStartedError:
        raise SnapshotAlreadyRunning(request.instance, request.host) from None


async def snapshot_result(handle: WorkflowHandle[Any, SnapshotRecord]) -> SnapshotRecord:
    """The finished snapshot; its failure as the caller's error where it was the caller's input."""
    try:
        return await handle.result()
    except WorkflowFailureError as failure:
        raise _as_service_error(failure) from None


async def snapshot_catalog(client: Client, request: SnapshotCatalogRequest) -> SnapshotCatalogResult:
    await check_host_has_worker(client, request.host)
    try:
        result: SnapshotCatalogResult = await client.execute_workflow(
            SNAPSHOT_CATALOG_WORKFLOW,
            request,
            result_type=SnapshotCatalogResult,
            id=f"snapshots:{request.host}:{uuid.uuid4().hex}",
            task_queue=WORKFLOW_TASK_QUEUE,
            static_summary=f"Snapshots on {request.host}: {request.action}",
        )
        return result
    except WorkflowFailureError as failure:
        raise _as_service_error(failure) from None


async def publish_snapshot(client: Client, request: PublishRequest) -> PublishedSnapshot:
    """Upload the snapshot into the host worker's Glance and wait for it; one publish per snapshot."""
    await check_host_has_worker(client, request.host)
    try:
        published: PublishedSnapshot = await client.execute_workflow(
            SNAPSHOT_PUBLISH_WORKFLOW,
            request,
            result_type=PublishedSnapshot,
            id=f"snapshot-publish:{request.host}:{request.snapshot_id}",
            task_queue=WORKFLOW_TASK_QUEUE,
            id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
            static_summary=f"Publish snapshot {request.snapshot_id} of {request.host} to Glance",
        )
    except WorkflowFailureError as failure:
        raise _as_service_error(failure) from None
    return published


def _as_service_error(failure: WorkflowFailureError) -> Exception:
    cause: BaseException | None = failure.cause
    while cause is not None and not isinstance(cause, ApplicationError):
        cause = cause.__cause__
    if isinstance(cause, ApplicationError) and cause.type in _NOT_FOUND:
        return SnapshotMissing(cause.message)
    if isinstance(cause, ApplicationError) and cause.type in _BAD_INPUT:
        return SnapshotRefused(cause.message)
    return failure
