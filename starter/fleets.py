"""What operators and services do with fleets: start, describe, steer, list. Shared by CLI and API.

A refusal is one of ``starter.errors``, with the data each edge needs to say it in its own words.

The fleet workflow, its queries and updates are referred to by name: this module needs their contract
(the models), not their code, so the CLI never imports the workflow (nor libvirt through it).
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from temporalio.client import Client, WorkflowExecutionStatus, WorkflowHandle
from temporalio.common import WorkflowIDConflictPolicy, WorkflowIDReusePolicy
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode

from starter.errors import BadRequest, FleetAlreadyRunning, FleetNotRunning, UnknownFleet
from workflows.fleet_models import (
    FLEET_WORKFLOW,
    BatchSize,
    ControlAnswer,
    FleetAbort,
    FleetInstances,
    FleetReport,
    FleetRequest,
    FleetStatus,
    FleetTarget,
    InstanceState,
    RebuildOptions,
    Selection,
    StrictFleetTarget,
    StrictInstancesPage,
    fleet_workflow_id,
)
from workflows.models import WORKFLOW_TASK_QUEUE, RebuildStatus, check_requested_by
from workflows.ui_text import escape_markdown, shown_image

CONTROLS = ("pause", "resume")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}


class BadInstancesFile(BadRequest):
    """An instances file that cannot be used; the message names the file and the line."""


def parse_duration(text: str) -> float:
    """``90``, ``30s``, ``5m``, ``1.5h``: seconds."""
    match = _DURATION.fullmatch(text)
    if not match:
        raise BadRequest(f"not a duration: {text!r} (examples: 30s, 5m, 1h)")
    return float(match.group(1)) * _UNITS[match.group(2)]


def read_instances_file(path: Path) -> list[FleetTarget]:
    """One ``HOST INSTANCE`` per line; blank lines and ``#`` comments are ignored."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise BadInstancesFile(f"cannot read {path}: {err}") from None
    targets: list[FleetTarget] = []
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        if len(fields) != 2:
            raise BadInstancesFile(f"{path}:{number}: expected 'HOST INSTANCE', got {line.strip()!r}")
        try:
            targets.append(StrictFleetTarget(host=fields[0], instance=fields[1]))
        except ValueError as err:
            raise BadInstancesFile(f"{path}:{number}: {err}") from None
    if not targets:
        raise BadInstancesFile(f"{path} names no instance")
    return targets


def default_name(rebuild: RebuildOptions, selection: Selection) -> str:
    """The same image and the same selection give the same name: a re-run is the same fleet."""
    key = rebuild.image_label + (rebuild.sha256 or "") + selection.model_dump_json()
    return f"fleet-{hashlib.sha256(key.encode()).hexdigest()[:10]}"


async def start_fleet(client: Client, request: FleetRequest) -> WorkflowHandle[Any, Any]:
    check_requested_by(request.rebuild.requested_by)
    selection = request.selection
    if selection is None or request.carried is not None:
        raise BadRequest("a new fleet needs a selection and no carried state")
    what = (
        f"{len(selection.instances)} listed instances"
        if selection.instances
        else f"instances matching {selection.name_pattern} on {', '.join(selection.hosts)}"
    )
    limits = request.limits
    try:
        return await client.start_workflow(
            FLEET_WORKFLOW,
            request,
            id=fleet_workflow_id(request.name),
            task_queue=WORKFLOW_TASK_QUEUE,
            id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE,
            id_conflict_policy=WorkflowIDConflictPolicy.FAIL,
            static_summary=escape_markdown(f"Fleet {request.name}: rebuild {what}"),
            static_details=escape_markdown(
                f"image: {shown_image(request.rebuild.image_label)}\n\n"
                f"sha256: {request.rebuild.sha256 or '(computed)'}\n\n"
                f"batches of {limits.batch_size}, at most {limits.max_unavailable} at once"
                f"{f', {limits.per_host} per host' if limits.per_host else ''}, "
                f"stop after {limits.max_failures} failure(s)\n\n"
                f"requested by: {request.rebuild.requested_by}",
                keep_paragraphs=True,
            ),
        )
    except WorkflowAlreadyStartedError:
        raise FleetAlreadyRunning(request.name) from None


class RunningInstance(BaseModel):
    host: str
    instance: str
    # The child's own phase, from its status query (None when it did not answer in time).
    phase: str | None = None


class FleetDescription(BaseModel):
    workflow_id: str
    workflow_status: str
    status: FleetStatus | None = None
    running: list[RunningInstance] = []
    report: FleetReport | None = None
    error: str | None = None
    # How many rebuilds run at a time where the exact failure budget, not the limits, bounds it.
    budget_window: int | None = None


def budget_window(status: FleetStatus) -> int | None:
    """The window the exact failure budget leaves, where it is narrower than the one the limits ask
    for (at most max_unavailable, at most a batch): a fleet never runs more rebuilds than failures it
    can still absorb, so an operator who set 20 at once sees why 3 run. None where it is not narrower."""
    limits = status.limits
    if not limits.exact_budget:
        return None
    left = max(limits.max_failures - status.counts.failures, 0)
    return left if left < min(limits.max_unavailable, limits.batch_size) else None


def budget_window_text(window: int, status: FleetStatus) -> str:
    limits = status.limits
    return (
        f"running {window} at a time: the failure budget leaves {window} "
        f"({status.counts.failures} of {limits.max_failures} failure(s) used; --max-unavailable "
        f"{limits.max_unavailable} applies once the budget allows it, or with --allow-overshoot)"
    )


async def fleet_handle(
    client: Client, name: str, must_run: bool = False
) -> tuple[WorkflowHandle[Any, Any], Any]:
    handle = client.get_workflow_handle(fleet_workflow_id(name))
    try:
        description = await handle.describe()
    except RPCError as exc:
        if exc.status == RPCStatusCode.NOT_FOUND:
            raise UnknownFleet(name) from None
        raise
    if must_run and description.status != WorkflowExecutionStatus.RUNNING:
        raise FleetNotRunning(name)
    return handle, description


async def describe_fleet(client: Client, name: str, child_phases: bool = True) -> FleetDescription:
    """Counts and limits from the fleet; the phase of each running rebuild from the rebuild itself."""
    handle, description = await fleet_handle(client, name)
    workflow_status = description.status.name if description.status else "UNKNOWN"
    try:
        status: FleetStatus | None = await asyncio.wait_for(
            handle.query("status", result_type=FleetStatus), 10
        )
    except (RPCError, TimeoutError):
        status = None
    described = FleetDescription(workflow_id=handle.id, workflow_status=workflow_status, status=status)
    if status is not None and description.status == WorkflowExecutionStatus.RUNNING:
        described.budget_window = budget_window(status)
    if status is not None:
        phases = await asyncio.gather(
            *(_child_phase(client, r.workflow_id) if child_phases else _none() for r in status.running)
        )
        described.running = [
            RunningInstance(host=r.host, instance=r.instance, phase=phase)
            for r, phase in zip(status.running, phases, strict=True)
        ]
    if description.status == WorkflowExecutionStatus.COMPLETED:
        described.report = FleetReport.model_validate(await handle.result())
    elif description.status not in (WorkflowExecutionStatus.RUNNING, None):
        try:
            await handle.result()
        except Exception as exc:  # the failure's message is what an operator needs
            described.error = str(getattr(exc, "cause", None) or exc)
    return described


async def _none() -> None:
    return None


async def _child_phase(client: Client, workflow_id: str) -> str | None:
    try:
        status = await asyncio.wait_for(
            client.get_workflow_handle(workflow_id).query("status", result_type=RebuildStatus), 5
        )
    except (RPCError, TimeoutError):
        return None
    return status.phase.value if isinstance(status, RebuildStatus) else None


async def fleet_instances(
    client: Client, name: str, state: InstanceState | None = None, offset: int = 0, limit: int = 1000
) -> FleetInstances:
    handle, _ = await fleet_handle(client, name)
    page: FleetInstances = await handle.query(
        "instances", StrictInstancesPage(state=state, offset=offset, limit=limit), result_type=FleetInstances
    )
    return page


async def control_fleet(client: Client, name: str, action: str) -> ControlAnswer:
    """pause or resume."""
    if action not in CONTROLS:
        raise BadRequest(f"not a control: {action!r} (one of {', '.join(CONTROLS)})")
    handle, _ = await fleet_handle(client, name, must_run=True)
    answer: ControlAnswer = await handle.execute_update(action, result_type=ControlAnswer)
    return answer


async def resize_fleet(client: Client, name: str, change: BatchSize) -> ControlAnswer:
    handle, _ = await fleet_handle(client, name, must_run=True)
    answer: ControlAnswer = await handle.execute_update("set_batch_size", change, result_type=ControlAnswer)
    return answer


async def abort_fleet(client: Client, name: str, request: FleetAbort) -> ControlAnswer:
    handle, _ = await fleet_handle(client, name, must_run=True)
    answer: ControlAnswer = await handle.execute_update("abort_fleet", request, result_type=ControlAnswer)
    return answer


class FleetSummary(BaseModel):
    name: str
    workflow_id: str
    status: str | None
    started: str
    summary: str | None = None


async def list_fleets(client: Client, running: bool, limit: int) -> list[FleetSummary]:
    query = f"WorkflowType = '{FLEET_WORKFLOW}'" + (" AND ExecutionStatus = 'Running'" if running else "")
    rows: list[FleetSummary] = []
    seen: set[str] = set()
    # Each run of a fleet that continued as new is an execution of its own: show the newest.
    async for execution in client.list_workflows(query):
        if execution.id in seen:
            continue
        if len(rows) >= limit:
            break
        seen.add(execution.id)
        rows.append(
            FleetSummary(
                name=execution.id.removeprefix("fleet:"),
                workflow_id=execution.id,
                status=execution.status.name if execution.status else None,
                started=execution.start_time.isoformat(),
            )
        )
    return rows


async def fleet_hosts(client: Client, name: str) -> list[str]:
    """The hosts a fleet touches, from its latest run's request (its selection, or the targets a
    continued run carries)."""
    handle, _ = await fleet_handle(client, name)
    async for event in handle.fetch_history_events():
        payloads = event.workflow_execution_started_event_attributes.input.payloads
        (request,) = await client.data_converter.decode(payloads, [FleetRequest])
        if request.selection is not None:
            return list(request.selection.all_hosts())
        carried = request.carried.targets if request.carried else []
        return list(dict.fromkeys(target.host for target in carried))
    raise UnknownFleet(name)
