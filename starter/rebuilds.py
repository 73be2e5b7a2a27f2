"""What operators and services do with rebuilds, once: start, describe, list, signal, abort.

The CLI and the HTTP API both call these and only translate the outcome (exit codes, HTTP statuses);
a refusal is one of ``starter.errors``, with the data each edge needs to say it in its own words.
They name the workflow, its query, signals and update (``workflows.models``), never import it: a
process that only talks to Temporal has no business loading libvirt and the activities.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import statistics
from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic import BaseModel, ValidationError
from temporalio.api.enums.v1 import PendingActivityState, TaskQueueType
from temporalio.api.taskqueue.v1 import TaskQueue
from temporalio.api.workflowservice.v1 import DescribeTaskQueueRequest
from temporalio.client import (
    Client,
    WorkflowExecution,
    WorkflowExecutionStatus,
    WorkflowFailureError,
    WorkflowHandle,
)
from temporalio.common import (
    WorkflowIDConflictPolicy,
    WorkflowIDReusePolicy,
)
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode

from common.connection import identity_host
from starter.errors import (
    BadFilter,
    BadRequest,
    Conflict,
    NoWorkerOnHost,
    RebuildAlreadyRunning,
    RebuildNotRunning,
    UnknownRebuild,
)
from workflows import search_attributes as sa
from workflows.identity import identity_problems
from workflows.models import (
    ABORT_UPDATE,
    APPROVE_SIGNAL,
    CONFIRM_SIGNAL,
    REVERT_SIGNAL,
    STATUS_QUERY,
    WORKFLOW_NAME,
    WORKFLOW_TASK_QUEUE,
    AbortAnswer,
    AbortRequest,
    Decision,
    FetchProgress,
    Outcome,
    Phase,
    RebuildRequest,
    RebuildResult,
    RebuildStatus,
    check_requested_by,
    host_task_queue,
    legacy_rebuild_workflow_id,
    rebuild_workflow_id,
)
from workflows.plan_models import RebuildPlan
from workflows.results import failure_result
from workflows.snapshot_models import snapshot_workflow_id
from workflows.ui_text import escape_markdown, shown_image

DECISIONS = (APPROVE_SIGNAL, CONFIRM_SIGNAL, REVERT_SIGNAL)
# A live worker polls again at least every ~70 s (a long poll lasts up to a minute); the server lists
# a poller for minutes after it is gone, so only a recent one counts.
POLLER_FRESH_SECONDS = 120.0
# A live worker with a free slot picks up an activity within milliseconds: one left scheduled this
# long means nobody polls the host's queue (or every slot is busy).
UNCLAIMED_AFTER_SECONDS = 15.0
_RPC_TIMEOUT = timedelta(seconds=10)
_FILTER_VALUE = re.compile(r"^[A-Za-z0-9_.:-]+$")


class PendingActivity(BaseModel):
    activity: str
    attempt: int
    last_error: str | None = None
    # From the download's last heartbeat: bytes so far and the image's size, when known.
    progress_bytes: int | None = None
    total_bytes: int | None = None
    # When the server last heard the step's heartbeat: the moment ``progress_bytes`` was true.
    heartbeat_at: datetime | None = None


class DownloadProgress(BaseModel):
    """The image download so far: bytes, size, and the speed and ETA since the fetch began.

    The speed is the average over the whole fetch (its phase's entry to the last heartbeat), so a
    download resumed after a crash is not shown faster than it is, and one heartbeat is enough.
    """

    done_bytes: int
    total_bytes: int | None = None
    started_at: datetime
    sampled_at: datetime
    # What was done at ``started_at``: a follower that saw an earlier sample measures from it instead.
    baseline_bytes: int = 0

    @property
    def bytes_per_second(self) -> float | None:
        seconds = (self.sampled_at - self.started_at).total_seconds()
        done = self.done_bytes - self.baseline_bytes
        return done / seconds if seconds > 0 and done > 0 else None

    def measured_since(self, earlier: DownloadProgress) -> DownloadProgress:
        """The speed between an earlier sample and this one: both carry the heartbeat's same lag, which
        cancels, and the time before the first byte (connection, cache lock) no longer counts."""
        if earlier.done_bytes >= self.done_bytes or earlier.sampled_at >= self.sampled_at:
            return self
        return self.model_copy(
            update={"started_at": earlier.sampled_at, "baseline_bytes": earlier.done_bytes}
        )

    @property
    def seconds_left(self) -> float | None:
        speed = self.bytes_per_second
        if speed is None or self.total_bytes is None:
            return None
        return max(self.total_bytes - self.done_bytes, 0) / speed


class RebuildDescription(BaseModel):
    workflow_id: str
    workflow_status: str
    status: RebuildStatus | None = None
    pending_activities: list[PendingActivity] = []
    # Set while a step waits for a host worker that is not there (wrong host, worker down).
    waiting_for_worker: str | None = None
    # A finished rebuild's result (its failure's details, when it failed), as the workflow returned it.
    result: RebuildResult | None = None
    # While the image downloads (from the fetch's heartbeats): what `watch` and `start --wait` show.
    download: DownloadProgress | None = None


class RebuildSummary(BaseModel):
    workflow_id: str
    run_id: str
    instance: str | None
    host: str | None
    phase: str | None
    status: str | None
    started: str


async def _pollers(client: Client, queue: str, kind: TaskQueueType.ValueType) -> dict[str, float]:
    """The workers the server lists for ``queue``, with the seconds since each last polled."""
    answer = await client.workflow_service.describe_task_queue(
        DescribeTaskQueueRequest(
            namespace=client.namespace, task_queue=TaskQueue(name=queue), task_queue_type=kind
        )
    )
    now = datetime.now(UTC)
    return {p.identity: (now - p.last_access_time.ToDatetime(UTC)).total_seconds() for p in answer.pollers}


async def _fresh_pollers(client: Client, queue: str, kind: TaskQueueType.ValueType) -> list[str]:
    """Identities of the workers that polled ``queue`` recently."""
    pollers = await _pollers(client, queue, kind)
    return [identity for identity, age in pollers.items() if age < POLLER_FRESH_SECONDS]


async def hosts_with_workers(client: Client) -> list[str]:
    """Hosts whose worker polls the shared workflow queue now (they name themselves in their identity)."""
    identities = await _fresh_pollers(client, WORKFLOW_TASK_QUEUE, TaskQueueType.TASK_QUEUE_TYPE_WORKFLOW)
    return sorted({host for identity in identities if (host := identity_host(identity))})


async def check_host_has_worker(client: Client, host: str, grace_seconds: float = 3.0) -> None:
    """Refuse a host nobody serves: the rebuild would sit scheduled forever (a mistyped ``--host``).

    A worker that has just started needs a moment before the server lists its first poll.
    """
    queue = host_task_queue(host)
    deadline = asyncio.get_running_loop().time() + grace_seconds
    while not await _fresh_pollers(client, queue, TaskQueueType.TASK_QUEUE_TYPE_ACTIVITY):
        if asyncio.get_running_loop().time() > deadline:
            raise NoWorkerOnHost(host, await hosts_with_workers(client))
        await asyncio.sleep(0.2)


async def start_rebuild(client: Client, request: RebuildRequest) -> WorkflowHandle[Any, RebuildResult]:
    """Start the workflow; one per instance at a time, so a second start is refused.

    A host without a worker is refused before anything starts.
    """
    check_requested_by(request.requested_by)
    if request.identity is not None and (problems := identity_problems(request.identity)):
        raise BadRequest("; ".join(problems))
    await check_host_has_worker(client, request.host)
    if await is_running(
        client.get_workflow_handle(legacy_rebuild_workflow_id(request.host, request.instance))
    ):
        # Started by an older version under the legacy ID: still the instance's one rebuild.
        raise RebuildAlreadyRunning(request.instance, request.host)
    if await is_running(client.get_workflow_handle(snapshot_workflow_id(request.host, request.instance))):
        raise Conflict(f"a snapshot of {request.instance} on {request.host} is being taken: rebuild it after")
    try:
        return await client.start_workflow(
            WORKFLOW_NAME,
            request,
            result_type=RebuildResult,
            id=rebuild_workflow_id(request.host, request.instance),
            task_queue=WORKFLOW_TASK_QUEUE,
            id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE,
            id_conflict_policy=WorkflowIDConflictPolicy.FAIL,
            search_attributes=sa.of_new_rebuild(
                request.instance, request.host, request.sha256 or request.image_label
            ),
            # Markdown in the Web UI: what callers wrote is escaped, a signed URL's credential left out.
            static_summary=escape_markdown(f"Rebuild {request.instance} on {request.host}"),
            static_details=escape_markdown(
                f"instance: {request.instance}\n\nhost: {request.host}\n\n"
                f"image: {shown_image(request.image_label)}\n\nsha256: {request.sha256 or '(computed)'}\n\n"
                f"requested by: {request.requested_by}",
                keep_paragraphs=True,
            ),
        )
    except WorkflowAlreadyStartedError:
        raise RebuildAlreadyRunning(request.instance, request.host) from None


# Phases in which a rebuild has not yet shown that its instance exists and can be rebuilt, or is
# ending (an inspect that failed rolls nothing back, but passes through these before the end).
_NOT_PAST_INSPECT = frozenset({Phase.PENDING, Phase.INSPECT, Phase.ROLLBACK, Phase.FAILED})
INSPECT_WAIT_SECONDS = 60.0


async def wait_past_inspect(
    handle: WorkflowHandle[Any, RebuildResult], give_up_after: float = INSPECT_WAIT_SECONDS
) -> Phase | None:
    """Wait until a rebuild that just started is past inspect: its phase then, or None once it ended.

    A wrong instance name, a host without the instance or a root disk no back end replaces fails
    inspect within a second; the caller learns it here instead of from a later ``status``. A rebuild
    still inspecting after ``give_up_after`` seconds (libvirt slow to answer) is left to run: its
    phase is returned.
    """
    deadline = asyncio.get_running_loop().time() + give_up_after
    phase = Phase.PENDING
    while True:
        description = await handle.describe(rpc_timeout=_RPC_TIMEOUT)
        if description.status != WorkflowExecutionStatus.RUNNING:
            return None
        with contextlib.suppress(RPCError, TimeoutError):
            phase = (await asyncio.wait_for(query_status(handle), 5)).phase
        if phase not in _NOT_PAST_INSPECT or asyncio.get_running_loop().time() > deadline:
            return phase
        await asyncio.sleep(0.1)


# Failures that mean the request itself was wrong (a name no host has, a disk no back end replaces, no
# image recorded), not that the rebuild broke: exit 2, HTTP 400.
BAD_INPUT_TYPES = frozenset({"InstanceNotFound", "UnsupportedInstance", "InvalidRequest"})


class RefusedAtInspect(BadRequest):
    """The rebuild ended at inspect because of what it was asked: nothing changed."""


async def start_past_inspect(
    client: Client, request: RebuildRequest
) -> tuple[WorkflowHandle[Any, RebuildResult], Phase | None]:
    """:func:`start_rebuild`, answered once the rebuild is past inspect (its phase then): a request
    that inspect refuses raises :class:`RefusedAtInspect` with inspect's reason. None: it ended
    otherwise, already (its result says how)."""
    handle = await start_rebuild(client, request)
    phase = await wait_past_inspect(handle)
    if phase is None:
        try:
            await handle.result(rpc_timeout=_RPC_TIMEOUT)
        except WorkflowFailureError as failure:
            outcome = failure_result(failure.cause)
            if outcome is not None and outcome.error_type in BAD_INPUT_TYPES:
                raise RefusedAtInspect(outcome.error or "refused at inspect") from None
    return handle, phase


async def latest_rebuild(
    client: Client, instance: str, host: str, must_run: bool = False
) -> tuple[WorkflowHandle[Any, RebuildResult], Any]:
    """The instance's latest rebuild and its description (under the legacy ID if only that exists)."""
    for workflow_id in (rebuild_workflow_id(host, instance), legacy_rebuild_workflow_id(host, instance)):
        handle = client.get_workflow_handle(workflow_id, result_type=RebuildResult)
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


async def is_running(handle: WorkflowHandle[Any, Any]) -> bool:
    try:
        return (await handle.describe()).status == WorkflowExecutionStatus.RUNNING
    except RPCError as exc:
        if exc.status == RPCStatusCode.NOT_FOUND:
            return False
        raise


async def query_status(handle: WorkflowHandle[Any, Any]) -> RebuildStatus:
    status: RebuildStatus = await handle.query(STATUS_QUERY, result_type=RebuildStatus)
    return status


async def describe_rebuild(
    client: Client, instance: str, host: str, unclaimed_after: float = UNCLAIMED_AFTER_SECONDS
) -> RebuildDescription:
    """Phase and timings from the workflow; attempts and last errors of running steps from Temporal.

    A step that no worker has picked up for ``unclaimed_after`` seconds is reported with the state of
    the host's queue: after a worker vanishes, its heartbeat timeout returns the step to the queue, so
    the status says so within that timeout plus ``unclaimed_after``.
    """
    handle, description = await latest_rebuild(client, instance, host)
    result = None
    if description.status == WorkflowExecutionStatus.RUNNING:
        try:
            status: RebuildStatus | None = await asyncio.wait_for(query_status(handle), 5)
        except (RPCError, TimeoutError):
            status = None
    else:
        # Closed: answered from what Temporal holds (its result and search attributes). A query would
        # need a worker to replay the whole history, and seconds when none polls.
        result = await _final_result(client, handle.id, description.run_id)
        if result is not None and result.plan is not None:
            result = result.model_copy(update={"plan": await with_measured_downtime(client, result.plan)})
        status = _final_status(description, result)
        if status is not None and status.image_url is None:
            # Ended without a result that names it (terminated, or a result from before it did).
            image = await _requested_image(client, handle.id, description.run_id)
            status = status.model_copy(update={"image_url": image})
    pending = []
    waiting: str | None = None
    now = datetime.now(UTC)
    for p in description.raw_description.pending_activities:
        if p.state == PendingActivityState.PENDING_ACTIVITY_STATE_SCHEDULED:
            unclaimed = (now - _ready_since(p)).total_seconds()
            if unclaimed > unclaimed_after and waiting is None:
                waiting = await _waiting_note(client, host, p.activity_type.name, unclaimed)
        progress = await _fetch_progress(client, p)
        pending.append(
            PendingActivity(
                activity=p.activity_type.name,
                attempt=p.attempt,
                last_error=p.last_failure.message if p.HasField("last_failure") else None,
                progress_bytes=progress.offset if progress else None,
                total_bytes=progress.total if progress else None,
                heartbeat_at=p.last_heartbeat_time.ToDatetime(UTC)
                if p.HasField("last_heartbeat_time")
                else None,
            )
        )
    return RebuildDescription(
        workflow_id=handle.id,
        workflow_status=description.status.name if description.status else "UNKNOWN",
        status=status,
        pending_activities=pending,
        waiting_for_worker=waiting,
        result=result,
        download=download_progress(status, pending),
    )


def download_progress(
    status: RebuildStatus | None, pending: list[PendingActivity]
) -> DownloadProgress | None:
    """The download's figures while the rebuild fetches: its heartbeat's bytes, timed from its phase."""
    if status is None or status.phase != Phase.FETCH:
        return None
    began = next((p.at for p in reversed(status.phases) if p.phase == Phase.FETCH), None)
    fetch = next((p for p in pending if p.progress_bytes and p.heartbeat_at), None)
    if began is None or fetch is None or fetch.progress_bytes is None or fetch.heartbeat_at is None:
        return None
    return DownloadProgress(
        done_bytes=fetch.progress_bytes,
        total_bytes=fetch.total_bytes,
        started_at=began,
        sampled_at=fetch.heartbeat_at,
    )


async def _final_result(client: Client, workflow_id: str, run_id: str) -> RebuildResult | None:
    """The closed run's RebuildResult: its return value, or the details of the failure it ended with."""
    run = client.get_workflow_handle(workflow_id, run_id=run_id)
    try:
        return RebuildResult.model_validate(await run.result(follow_runs=False, rpc_timeout=_RPC_TIMEOUT))
    except WorkflowFailureError as failure:
        return failure_result(failure.cause)
    except ValidationError:
        return None


async def _requested_image(client: Client, workflow_id: str, run_id: str) -> str | None:
    """The image as the run's request named it, from the first event of its history."""
    run = client.get_workflow_handle(workflow_id, run_id=run_id)
    async for event in run.fetch_history_events(rpc_timeout=_RPC_TIMEOUT):
        payloads = event.workflow_execution_started_event_attributes.input.payloads
        try:
            (request,) = await client.data_converter.decode(payloads, [RebuildRequest])
        except Exception:
            return None
        return request.image_label if isinstance(request, RebuildRequest) else None
    return None


# How many of a host's latest rebuilds a dry run's plan measures its downtime by.
MEASURED_REBUILDS = 10


async def with_measured_downtime(client: Client, plan: RebuildPlan) -> RebuildPlan:
    """The plan with the median downtime (off to running) of its host's latest rebuilds, where any
    were rebuilt and this one would stop and start its instance too."""
    if plan.downtime.graceful_stop_bound_seconds is None or not plan.downtime.starts_after:
        return plan
    rows = await list_rebuilds(client, list_query(Phase.DONE.value, plan.host, False), MEASURED_REBUILDS)
    results = await asyncio.gather(*(_final_result(client, row.workflow_id, row.run_id) for row in rows))
    downtimes = [r.downtime_seconds for r in results if r is not None and r.downtime_seconds is not None]
    if not downtimes:
        return plan
    measured = {"measured_median_seconds": statistics.median(downtimes), "measured_rebuilds": len(downtimes)}
    return plan.model_copy(update={"downtime": plan.downtime.model_copy(update=measured)})


def _final_status(description: Any, result: RebuildResult | None) -> RebuildStatus | None:
    attributes = {pair.key.name: pair.value for pair in description.typed_search_attributes}
    instance, host = attributes.get(sa.INSTANCE_ID.name), attributes.get(sa.HYPERVISOR_HOST.name)
    phase_name = attributes.get(sa.REBUILD_PHASE.name)
    if result is not None:
        instance, host = result.instance, result.host
        fallback = Phase.DONE if result.outcome == Outcome.REBUILT else Phase.FAILED
        if result.outcome == Outcome.PLANNED:
            fallback = Phase.PLANNED
        if result.outcome == Outcome.ROLLED_BACK:
            fallback = Phase.ROLLED_BACK
    else:
        fallback = Phase.FAILED
    if instance is None or host is None:
        return None
    try:
        phase = Phase(phase_name) if phase_name else fallback
    except ValueError:
        phase = fallback
    return RebuildStatus(
        instance=instance,
        host=host,
        phase=phase,
        image_url=result.image_url if result else None,
        image_sha256=result.image_sha256 if result else None,
        step_seconds=dict(result.step_seconds) if result else {},
        last_error=result.error if result else None,
        started_at=description.start_time,
        stopped_by=result.stopped_by if result else None,
        verified_by=result.verified_by if result else None,
        disk_mode=result.disk_mode if result else None,
        plan=result.plan if result else None,
    )


def _ready_since(pending: Any) -> datetime:
    """Since when a scheduled step could have been taken: not while it waits out a retry's backoff."""
    times = [
        getattr(pending, name).ToDatetime(UTC)
        for name in ("scheduled_time", "last_attempt_complete_time", "next_attempt_schedule_time")
        if pending.HasField(name)
    ]
    return max(times, default=datetime.now(UTC))


async def _waiting_note(client: Client, host: str, activity: str, unclaimed: float) -> str:
    queue = host_task_queue(host)
    pollers = await _pollers(client, queue, TaskQueueType.TASK_QUEUE_TYPE_ACTIVITY)
    seen = f"last poll {min(pollers.values()):.0f} s ago" if pollers else "no worker ever polled it"
    return (
        f"no worker on host {host}: {activity} has waited {unclaimed:.0f} s on {queue} "
        f"unclaimed ({seen}); is the host's rebuild-worker running?"
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
    clauses = [f"WorkflowType = '{WORKFLOW_NAME}'"]
    for key, value in ((sa.REBUILD_PHASE, phase), (sa.HYPERVISOR_HOST, host)):
        if value is not None:
            if not _FILTER_VALUE.fullmatch(value):
                raise BadFilter(value)
            clauses.append(f"{key.name} = '{value}'")
    if running:
        clauses.append("ExecutionStatus = 'Running'")
    return " AND ".join(clauses)


async def list_rebuilds(client: Client, query: str, limit: int) -> list[RebuildSummary]:
    rows, _ = await list_rebuilds_page(client, query, limit, None)
    return rows


async def list_rebuilds_page(
    client: Client, query: str, limit: int, cursor: bytes | None
) -> tuple[list[RebuildSummary], bytes | None]:
    """One page of at most ``limit`` rebuilds from ``cursor`` on (Temporal's next-page token), and
    the cursor of the next page (None after the last)."""
    pages = client.list_workflows(query, page_size=limit, next_page_token=cursor)
    try:
        await pages.fetch_next_page()
    except RPCError as err:
        # A token it cannot decode: INVALID_ARGUMENT from some servers, UNKNOWN from the dev server.
        if cursor is None or err.status not in CURSOR_REFUSALS:
            raise
        raise BadCursor(f"the cursor is not one Temporal gave for this list: {err.message}") from None
    rows = [_summary(execution) for execution in pages.current_page or ()]
    return rows, pages.next_page_token


CURSOR_REFUSALS = frozenset({RPCStatusCode.INVALID_ARGUMENT, RPCStatusCode.INTERNAL, RPCStatusCode.UNKNOWN})


class BadCursor(BadRequest):
    """A page cursor that is not Temporal's next-page token for this list."""


def _summary(execution: WorkflowExecution) -> RebuildSummary:
    attributes = {pair.key.name: pair.value for pair in execution.typed_search_attributes}
    return RebuildSummary(
        workflow_id=execution.id,
        run_id=execution.run_id,
        instance=attributes.get(sa.INSTANCE_ID.name),
        host=attributes.get(sa.HYPERVISOR_HOST.name),
        phase=attributes.get(sa.REBUILD_PHASE.name),
        status=execution.status.name if execution.status else None,
        started=execution.start_time.isoformat(),
    )


async def send_decision(client: Client, instance: str, host: str, verdict: str, decision: Decision) -> str:
    """approve, confirm or revert; the workflow records one that makes no sense in its phase."""
    if verdict not in DECISIONS:
        raise BadRequest(f"not a decision: {verdict!r} (one of {', '.join(DECISIONS)})")
    check_requested_by(decision.requested_by)
    handle, _ = await latest_rebuild(client, instance, host, must_run=True)
    await handle.signal(verdict, decision)
    return handle.id


async def abort_rebuild(client: Client, instance: str, host: str, request: AbortRequest) -> AbortAnswer:
    check_requested_by(request.requested_by)
    handle, _ = await latest_rebuild(client, instance, host, must_run=True)
    answer: AbortAnswer = await handle.execute_update(ABORT_UPDATE, request, result_type=AbortAnswer)
    return answer


async def rebuild_requested_by(client: Client, instance: str, host: str) -> str:
    """Who started the instance's latest rebuild, from its request as the history holds it."""
    handle, _ = await latest_rebuild(client, instance, host, must_run=True)
    async for event in handle.fetch_history_events():
        payloads = event.workflow_execution_started_event_attributes.input.payloads
        (request,) = await client.data_converter.decode(payloads, [RebuildRequest])
        return str(request.requested_by)
    raise UnknownRebuild(instance, host)
