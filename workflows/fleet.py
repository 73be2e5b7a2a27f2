"""The FleetRebuild workflow: a rolling rebuild of many instances, each one a ``RebuildInstance`` child.

Nova rebuilds one server per API call and leaves the loop to the operator; here the loop is durable.
Which rebuild starts when, and when the fleet stops, is the pure plan in ``workflows/fleet_plan.py``
(batches, ``max_unavailable``, ``per_host``, the exact failure budget); this workflow drives it: it lists
the hosts' instances, prefetches the image on every host (``workflows/image_steps.py``, the rebuild's
own steps), starts the children the plan picks and tells the plan how each one ended.

Children use the single rebuild's workflow ID (``rebuild:<host>:<instance>``), so a single rebuild of an
instance the fleet is working on is refused, and an instance someone is already rebuilding is skipped.
Before its history grows large the workflow stops starting children, lets the running ones finish and
continues as new, carrying the plan's state: no child ever outlives the run that started it.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
from datetime import timedelta
from typing import Any

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import (
    ActivityError,
    ApplicationError,
    ChildWorkflowError,
    FailureError,
    WorkflowAlreadyStartedError,
)

with workflow.unsafe.imports_passed_through():
    from workflows import contract, image_steps
    from workflows import search_attributes as sa
    from workflows.activity_models import HostInventory, ListInstancesInput
    from workflows.fleet_models import (
        BatchSize,
        ControlAnswer,
        FleetAbort,
        FleetInstances,
        FleetPhase,
        FleetReport,
        FleetRequest,
        FleetStatus,
        InstancesPage,
        InstanceState,
    )
    from workflows.fleet_plan import FleetPlan, Then
    from workflows.image_steps import In, Out
    from workflows.models import AbortRequest, Outcome, Phase, RebuildResult
    from workflows.names import (
        ABORT_FLEET_UPDATE,
        ABORT_SIGNAL,
        FLEET_INSTANCES_QUERY,
        FLEET_STATUS_QUERY,
        FLEET_WORKFLOW,
        PATCH_FLEET_WAITS_FOR_HANDLERS,
        PATCH_PREFETCH_REFUSES_CONTRADICTION,
        PAUSE_UPDATE,
        RESUME_UPDATE,
        SET_BATCH_SIZE_UPDATE,
        WORKFLOW_NAME,
        host_task_queue,
        rebuild_workflow_id,
    )
    from workflows.results import failure_result

# A host whose worker does not answer its listing within this is reported, before anything changes.
DISCOVERY_SCHEDULE_TO_START = timedelta(minutes=2)
PREFETCH_TIMEOUT = timedelta(hours=6)


@workflow.defn(name=FLEET_WORKFLOW)
class FleetRebuild:
    @workflow.init
    def __init__(self, request: FleetRequest) -> None:
        self._request = request
        if request.carried is None:
            self._plan = FleetPlan(limits=request.limits, image_sha256=request.rebuild.sha256)
        else:
            self._plan = FleetPlan.resume(request.carried)
        self._children: dict[int, workflow.ChildWorkflowHandle[object, RebuildResult] | None] = {}
        self._changed = False
        # Strong references to the children's tasks, so none is collected while it runs.
        self._tasks: set[asyncio.Task[None]] = set()

    # ---- queries -------------------------------------------------------------------------------

    @workflow.query(name=FLEET_STATUS_QUERY)
    def status(self) -> FleetStatus:
        history_length = workflow.info().get_current_history_length()
        return self._plan.status(self._request.name, self._request.rebuild.image_label, history_length)

    @workflow.query(name=FLEET_INSTANCES_QUERY)
    def instances(self, page: InstancesPage) -> FleetInstances:
        """Every instance's state, a page at a time (a fleet can be too large for one answer)."""
        total, items = self._plan.entries(page.state, page.offset, page.limit)
        return FleetInstances(total=total, items=items)

    # ---- controls ------------------------------------------------------------------------------

    @workflow.update(name=PAUSE_UPDATE)
    def pause(self) -> ControlAnswer:
        """Start no new rebuilds; those running finish."""
        return self._pause(True)

    @workflow.update(name=RESUME_UPDATE)
    def resume(self) -> ControlAnswer:
        return self._pause(False)

    def _pause(self, paused: bool) -> ControlAnswer:
        if not self._plan.set_paused(paused):
            return self._answer(False, "already paused" if paused else "not paused")
        self._poke()
        return self._answer(
            True, "paused: running rebuilds finish, no new ones start" if paused else "resumed"
        )

    @workflow.update(name=SET_BATCH_SIZE_UPDATE)
    def set_batch_size(self, change: BatchSize) -> ControlAnswer:
        """Takes effect with the next batch."""
        self._plan.set_batch_size(change.batch_size)
        self._poke()
        return self._answer(True, f"batch size {change.batch_size} from the next batch on")

    @workflow.update(name=ABORT_FLEET_UPDATE)
    async def abort_fleet(self, request: FleetAbort) -> ControlAnswer:
        """Start nothing more, and abort every running rebuild: each puts its instance back."""
        plan = self._plan
        if plan.abort_reason is not None:
            return self._answer(False, f"already aborting: {plan.abort_reason}")
        if plan.phase == FleetPhase.DONE:
            return self._answer(False, "the fleet is over")
        plan.abort_reason = f"{request.reason} (by {request.requested_by})"
        self._poke()
        running = [h for h in self._children.values() if h is not None]
        await asyncio.gather(*(self._abort_child(h) for h in running))
        return self._answer(True, f"aborted; {len(running)} running rebuild(s) asked to roll back")

    def _answer(self, accepted: bool, message: str) -> ControlAnswer:
        plan = self._plan
        return ControlAnswer(
            accepted=accepted, message=message, paused=plan.paused, batch_size=plan.limits.batch_size
        )

    # ---- the run -------------------------------------------------------------------------------

    @workflow.run
    async def run(self, request: FleetRequest) -> FleetReport:
        plan = self._plan
        if request.carried is None:
            plan.started_at = workflow.now()
            await self._discover(request)
            if request.prefetch:
                await self._prefetch_everywhere(request)
            plan.skip_current()
            plan.begin_batch()
        try:
            await self._roll()
        except asyncio.CancelledError:
            # Cancelled as a whole: the running rebuilds put their instances back before we go.
            if plan.abort_reason is None:
                plan.abort_reason = "the fleet workflow was cancelled"
                await asyncio.gather(*(self._abort_child(h) for h in self._children.values() if h))
            await workflow.wait_condition(lambda: not self._children)
            raise
        # An abort_fleet update may still be signalling the children: it answers before the fleet ends.
        if not workflow.all_handlers_finished() and workflow.patched(PATCH_FLEET_WAITS_FOR_HANDLERS):
            await workflow.wait_condition(workflow.all_handlers_finished)
        plan.phase = FleetPhase.DONE
        self._publish()
        return plan.report(request.name)

    async def _roll(self) -> None:
        """Start what the plan picks, wait for what it waits for, until it says the fleet is done."""
        plan = self._plan
        plan.phase = FleetPhase.ROLLING
        while True:
            step = plan.advance(history_full=self._history_full())
            for index in step.start:
                self._children[index] = None
                target = plan.targets[index]
                self._tasks.add(asyncio.create_task(self._rebuild(index), name=f"rebuild {target.key}"))
            self._publish()
            if step.then == Then.DONE:
                return
            if step.then == Then.NEXT_BATCH:
                await self._between_batches()
                plan.begin_batch()
                continue
            if step.then == Then.CONTINUE_AS_NEW:
                await workflow.wait_condition(workflow.all_handlers_finished)
                # The selection is in the targets now; carrying it too would double a 10,000-instance
                # payload.
                workflow.continue_as_new(
                    self._request.model_copy(update={"carried": plan.progress(), "selection": None})
                )
            await workflow.wait_condition(lambda: self._changed)
            self._changed = False

    def _history_full(self) -> bool:
        info = workflow.info()
        return (
            info.is_continue_as_new_suggested()
            or info.get_current_history_length() >= self._request.history_event_limit
        )

    async def _between_batches(self) -> None:
        seconds = self._plan.limits.pause_between_seconds
        if seconds <= 0:
            return
        with contextlib.suppress(builtins.TimeoutError):
            await workflow.wait_condition(
                lambda: self._plan.abort_reason is not None, timeout=timedelta(seconds=seconds)
            )

    # ---- one child -----------------------------------------------------------------------------

    async def _rebuild(self, index: int) -> None:
        target = self._plan.targets[index]
        options = self._request.rebuild
        request = options.request_for(target)
        try:
            handle = await workflow.start_child_workflow(
                WORKFLOW_NAME,
                request,
                id=rebuild_workflow_id(target.host, target.instance),
                result_type=RebuildResult,
                # Terminating the fleet must not cut a rebuild in half: the child rolls back instead.
                parent_close_policy=workflow.ParentClosePolicy.REQUEST_CANCEL,
                search_attributes=sa.of_new_rebuild(
                    target.instance, target.host, self._plan.image_sha256 or options.image_label
                ),
                static_summary=f"Rebuild {target.instance} on {target.host} (fleet {self._request.name})",
            )
        except WorkflowAlreadyStartedError:
            self._finish(index, InstanceState.SKIPPED, "a rebuild of it was already running")
            return
        self._children[index] = handle
        if self._plan.abort_reason is not None:
            await self._abort_child(handle)
        try:
            await handle
        except ChildWorkflowError as err:
            self._finish(index, *self._failure(err))
        else:
            self._finish(index, InstanceState.REBUILT, None)

    def _failure(self, err: ChildWorkflowError) -> tuple[InstanceState, str]:
        cause = err.cause
        message = cause.message if isinstance(cause, FailureError) else str(err)
        result = failure_result(cause)
        if result is None:
            return InstanceState.FAILED, message
        if result.error_type == "Aborted" and result.outcome in (Outcome.ROLLED_BACK, Outcome.UNCHANGED):
            return InstanceState.ABORTED, message
        if result.outcome == Outcome.ROLLED_BACK:
            return InstanceState.ROLLED_BACK, message
        return InstanceState.FAILED, message

    async def _abort_child(self, handle: workflow.ChildWorkflowHandle[object, RebuildResult]) -> None:
        reason = f"fleet {self._request.name} aborted: {self._plan.abort_reason}"[:500]
        # A child that finished meanwhile refuses the signal; its result tells what happened.
        with contextlib.suppress(FailureError):
            await handle.signal(
                ABORT_SIGNAL, AbortRequest(reason=reason, requested_by=f"fleet {self._request.name}")
            )

    def _finish(self, index: int, state: InstanceState, note: str | None) -> None:
        self._children.pop(index, None)
        self._tasks = {t for t in self._tasks if not t.done()}
        self._plan.finish(index, state, note)
        self._poke()

    # ---- before the first rebuild --------------------------------------------------------------

    async def _discover(self, request: FleetRequest) -> None:
        """What each host's worker reports: which instances exist, and the image each one runs."""
        self._plan.phase = FleetPhase.DISCOVER
        selection = request.selection
        assert selection is not None  # only a run that continues another has none, and it has targets
        hosts = selection.all_hosts()
        listings = await asyncio.gather(*(self._list_host(host, selection.name_pattern) for host in hosts))
        self._plan.select(selection, dict(zip(hosts, listings, strict=True)))

    async def _list_host(self, host: str, pattern: str | None) -> HostInventory:
        try:
            listing: HostInventory = await contract.list_instances.start(
                ListInstancesInput(name_pattern=pattern),
                task_queue=host_task_queue(host),
                schedule_to_start_timeout=DISCOVERY_SCHEDULE_TO_START,
                start_to_close_timeout=timedelta(minutes=1),
                retry_policy=RetryPolicy(maximum_attempts=5),
                summary=f"discover: {host}",
            )
            return listing
        except ActivityError as err:
            raise ApplicationError(
                f"host {host} did not list its instances: {_innermost(err)}; nothing was started",
                type="FleetDiscoveryFailed",
                non_retryable=True,
            ) from None

    async def _prefetch_everywhere(self, request: FleetRequest) -> None:
        """Fetch and check the image on every host with work, before the first instance stops."""
        self._plan.phase = FleetPhase.PREFETCH
        hosts = self._plan.hosts_with_work()
        digests = await asyncio.gather(*(self._prefetch(request, host) for host in hosts))
        if len(set(digests)) > 1:
            raise ApplicationError(
                "the hosts fetched different images for the same source; nothing was started",
                type="FleetPrefetchFailed",
                non_retryable=True,
            )
        if digests:
            self._plan.image_sha256 = digests[0]

    async def _prefetch(self, request: FleetRequest, host: str) -> str:
        """The rebuild's own image steps on one host: what a child would refuse is refused here, once."""

        async def run(phase: Phase, activity: contract.HostActivity[In, Out], argument: In) -> Out:
            return await activity.start(
                argument, task_queue=host_task_queue(host), **_prefetch_options(phase, host)
            )

        try:
            image = await image_steps.fetch_and_check(
                request.rebuild,
                run,
                refuse_contradiction=lambda: workflow.patched(PATCH_PREFETCH_REFUSES_CONTRADICTION),
            )
        except (ActivityError, ApplicationError) as err:
            raise ApplicationError(
                f"prefetch failed on host {host}: {_innermost(err)}; nothing was started",
                type="FleetPrefetchFailed",
                non_retryable=True,
            ) from None
        return image.cached.sha256

    # ---- bookkeeping ---------------------------------------------------------------------------

    def _poke(self) -> None:
        self._changed = True

    def _publish(self) -> None:
        workflow.set_current_details(self._plan.details(self._request.name))


def _prefetch_options(phase: Phase, host: str) -> dict[str, Any]:
    retry = RetryPolicy(maximum_attempts=5, maximum_interval=timedelta(seconds=30))
    if phase == Phase.RESOLVE:
        return {"start_to_close_timeout": timedelta(minutes=1), "retry_policy": retry}
    if phase == Phase.FETCH:
        return {
            "start_to_close_timeout": PREFETCH_TIMEOUT,
            "heartbeat_timeout": timedelta(seconds=10),
            "retry_policy": retry,
            "summary": f"prefetch: {host}",
        }
    return {
        "start_to_close_timeout": timedelta(minutes=3),
        "heartbeat_timeout": timedelta(seconds=10),
        "retry_policy": RetryPolicy(maximum_attempts=3),
        "summary": f"prefetch check: {host}",
    }


def _innermost(err: BaseException) -> str:
    message = str(err)
    current: BaseException | None = err
    while current is not None:
        if isinstance(current, FailureError):
            message = current.message
        current = current.__cause__
    return message
