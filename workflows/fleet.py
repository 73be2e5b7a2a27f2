"""The FleetRebuild workflow: a rolling rebuild of many instances, each one a ``RebuildInstance`` child.

Nova rebuilds one server per API call and leaves the loop to the operator; here the loop is durable.
The instances are taken in batches; inside a batch a rebuild starts whenever a slot frees up, and three
limits hold at every instant:

- at most ``max_unavailable`` rebuilds run at once (only a running rebuild can have its instance down);
- at most ``per_host`` of them on one host;
- never more rebuilds run than failures the budget can still absorb (``exact_budget``, the default),
  so the fleet stops at exactly ``max_failures`` failures instead of overshooting by whatever was in
  flight. The price: the window is min(max_unavailable, failures left), so it narrows near the budget.

Children use the single rebuild's workflow ID (``rebuild:<host>:<instance>``), so a single rebuild of an
instance the fleet is working on is refused, and an instance someone is already rebuilding is skipped.
Before its history grows large the workflow stops starting children, lets the running ones finish and
continues as new, carrying every instance's state: no child ever outlives the run that started it.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
from collections import Counter, deque
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
    from workflows.activity_models import (
        HostInventory,
        ListInstancesInput,
    )
    from workflows.fleet_models import (
        FAILURES,
        MAX_NOTE,
        BatchSize,
        ControlAnswer,
        FleetAbort,
        FleetCounts,
        FleetInstance,
        FleetInstances,
        FleetLimits,
        FleetPhase,
        FleetProgress,
        FleetReport,
        FleetRequest,
        FleetStatus,
        FleetTarget,
        InstancesPage,
        InstanceState,
    )
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

# A host whose worker does not answer its listing within this is reported, before anything changes.
DISCOVERY_SCHEDULE_TO_START = timedelta(minutes=2)
PREFETCH_TIMEOUT = timedelta(hours=6)
MAX_PROBLEMS_SHOWN = 100


@workflow.defn(name=FLEET_WORKFLOW)
class FleetRebuild:
    @workflow.init
    def __init__(self, request: FleetRequest) -> None:
        self._request = request
        carried = request.carried
        self._targets: list[FleetTarget] = list(carried.targets) if carried else []
        self._states: list[InstanceState] = list(carried.states) if carried else []
        self._notes: dict[int, str] = dict(carried.notes) if carried else {}
        self._limits: FleetLimits = carried.limits if carried else request.limits
        self._paused = carried.paused if carried else False
        self._abort_reason: str | None = carried.abort_reason if carried else None
        self._image_sha256 = carried.image_sha256 if carried else request.rebuild.sha256
        self._runs = carried.runs if carried else 1
        self._started_at = carried.started_at if carried else None
        self._batch_start = carried.batch_start if carried else 0
        self._batch_end = carried.batch_end if carried else 0
        self._batch_number = carried.batch_number if carried else 0
        self._phase = FleetPhase.ROLLING if carried else FleetPhase.DISCOVER
        self._counts: Counter[InstanceState] = Counter(self._states)
        self._problems: list[int] = [i for i, s in enumerate(self._states) if s in FAILURES]
        self._children: dict[int, workflow.ChildWorkflowHandle[object, RebuildResult] | None] = {}
        self._per_host: Counter[str] = Counter()
        self._waiting_by_host: dict[str, deque[int]] = {}
        self._round_robin = 0
        self._stop_reason: str | None = None
        self._changed = False
        # The image each instance ran when the fleet began (from the hosts' listings).
        self._current_images: dict[int, str | None] = {}
        # Strong references to the children's tasks, so none is collected while it runs.
        self._tasks: set[asyncio.Task[None]] = set()

    # ---- queries -------------------------------------------------------------------------------

    @workflow.query(name=FLEET_STATUS_QUERY)
    def status(self) -> FleetStatus:
        remaining = max(len(self._targets) - self._batch_end, 0)
        batches = self._batch_number + 1 + -(-remaining // self._limits.batch_size)
        return FleetStatus(
            name=self._request.name,
            phase=self._phase,
            paused=self._paused,
            image=self._request.rebuild.image_label,
            image_sha256=self._image_sha256,
            limits=self._limits,
            counts=self._count(),
            batch_number=self._batch_number,
            batches=batches,
            running=[self._entry(i) for i in self._children],
            problems=[self._entry(i) for i in self._problems[-MAX_PROBLEMS_SHOWN:]],
            abort_reason=self._abort_reason,
            stop_reason=self._stop_reason,
            runs=self._runs,
            history_length=workflow.info().get_current_history_length(),
            started_at=self._started_at,
        )

    @workflow.query(name=FLEET_INSTANCES_QUERY)
    def instances(self, page: InstancesPage) -> FleetInstances:
        """Every instance's state, a page at a time (a fleet can be too large for one answer)."""
        chosen = [i for i, s in enumerate(self._states) if page.state is None or s == page.state]
        window = chosen[page.offset : page.offset + page.limit]
        return FleetInstances(total=len(chosen), items=[self._entry(i) for i in window])

    # ---- controls ------------------------------------------------------------------------------

    @workflow.update(name=PAUSE_UPDATE)
    def pause(self) -> ControlAnswer:
        """Start no new rebuilds; those running finish."""
        if self._paused:
            return self._answer(False, "already paused")
        self._paused = True
        self._poke()
        return self._answer(True, "paused: running rebuilds finish, no new ones start")

    @workflow.update(name=RESUME_UPDATE)
    def resume(self) -> ControlAnswer:
        if not self._paused:
            return self._answer(False, "not paused")
        self._paused = False
        self._poke()
        return self._answer(True, "resumed")

    @workflow.update(name=SET_BATCH_SIZE_UPDATE)
    def set_batch_size(self, change: BatchSize) -> ControlAnswer:
        """Takes effect with the next batch."""
        self._limits = self._limits.model_copy(update={"batch_size": change.batch_size})
        self._poke()
        return self._answer(True, f"batch size {change.batch_size} from the next batch on")

    @workflow.update(name=ABORT_FLEET_UPDATE)
    async def abort_fleet(self, request: FleetAbort) -> ControlAnswer:
        """Start nothing more, and abort every running rebuild: each puts its instance back."""
        if self._abort_reason is not None:
            return self._answer(False, f"already aborting: {self._abort_reason}")
        if self._phase == FleetPhase.DONE:
            return self._answer(False, "the fleet is over")
        self._abort_reason = f"{request.reason} (by {request.requested_by})"
        self._poke()
        running = [h for h in self._children.values() if h is not None]
        await asyncio.gather(*(self._abort_child(h) for h in running))
        return self._answer(True, f"aborted; {len(running)} running rebuild(s) asked to roll back")

    def _answer(self, accepted: bool, message: str) -> ControlAnswer:
        return ControlAnswer(
            accepted=accepted, message=message, paused=self._paused, batch_size=self._limits.batch_size
        )

    # ---- the run -------------------------------------------------------------------------------

    @workflow.run
    async def run(self, request: FleetRequest) -> FleetReport:
        if request.carried is None:
            self._started_at = workflow.now()
            await self._discover(request)
            if request.prefetch:
                await self._prefetch_everywhere(request)
            self._skip_current()
            self._begin_batch()
        else:
            self._queue_batch()
        try:
            await self._roll()
        except asyncio.CancelledError:
            # Cancelled as a whole: the running rebuilds put their instances back before we go.
            if self._abort_reason is None:
                self._abort_reason = "the fleet workflow was cancelled"
                await asyncio.gather(*(self._abort_child(h) for h in self._children.values() if h))
            await workflow.wait_condition(lambda: not self._children)
            raise
        # An abort_fleet update may still be signalling the children: it answers before the fleet ends.
        if not workflow.all_handlers_finished() and workflow.patched(PATCH_FLEET_WAITS_FOR_HANDLERS):
            await workflow.wait_condition(workflow.all_handlers_finished)
        self._phase = FleetPhase.DONE
        self._publish()
        return FleetReport(
            name=request.name,
            counts=self._count(),
            stop_reason=self._stop_reason,
            problems=[self._entry(i) for i in self._problems[-1000:]],
            runs=self._runs,
        )

    async def _roll(self) -> None:
        self._phase = FleetPhase.ROLLING
        while True:
            self._start_what_fits()
            if self._must_stop():
                self._phase = FleetPhase.STOPPING
            self._publish()
            if not self._children:
                if self._must_stop():
                    return
                if not self._waiting_by_host:
                    if self._batch_end >= len(self._targets):
                        return
                    await self._between_batches()
                    self._begin_batch()
                    continue
                if self._history_full():
                    await workflow.wait_condition(workflow.all_handlers_finished)
                    workflow.continue_as_new(self._carry())
            await workflow.wait_condition(lambda: self._changed)
            self._changed = False

    def _start_what_fits(self) -> None:
        if self._paused or self._must_stop() or self._history_full():
            return
        limits = self._limits
        while len(self._children) < limits.max_unavailable and (
            not limits.exact_budget or len(self._children) < limits.max_failures - self._count().failures
        ):
            index = self._next_waiting()
            if index is None:
                return
            target = self._targets[index]
            self._children[index] = None
            self._per_host[target.host] += 1
            self._set_state(index, InstanceState.RUNNING)
            self._tasks.add(asyncio.create_task(self._rebuild(index), name=f"rebuild {target.key}"))

    def _next_waiting(self) -> int | None:
        """Round-robin over the batch's hosts, skipping hosts at their limit."""
        hosts = list(self._waiting_by_host)
        for _ in hosts:
            host = hosts[self._round_robin % len(hosts)]
            self._round_robin += 1
            if self._limits.per_host is not None and self._per_host[host] >= self._limits.per_host:
                continue
            queue = self._waiting_by_host[host]
            index = queue.popleft()
            if not queue:
                del self._waiting_by_host[host]
            return index
        return None

    def _must_stop(self) -> bool:
        if self._abort_reason is not None:
            self._stop_reason = f"aborted: {self._abort_reason}"
            return True
        failures = self._count().failures
        if failures >= self._limits.max_failures:
            self._stop_reason = f"failure budget spent: {failures} of {self._limits.max_failures} failed"
            return True
        return False

    def _history_full(self) -> bool:
        info = workflow.info()
        return (
            info.is_continue_as_new_suggested()
            or info.get_current_history_length() >= self._request.history_event_limit
        )

    def _begin_batch(self) -> None:
        if self._batch_end > 0:
            self._batch_number += 1
        self._batch_start = self._batch_end
        self._batch_end = min(self._batch_start + self._limits.batch_size, len(self._targets))
        self._queue_batch()

    def _queue_batch(self) -> None:
        self._waiting_by_host = {}
        for index in range(self._batch_start, self._batch_end):
            if self._states[index] == InstanceState.WAITING:
                host = self._targets[index].host
                self._waiting_by_host.setdefault(host, deque()).append(index)

    async def _between_batches(self) -> None:
        seconds = self._limits.pause_between_seconds
        if seconds <= 0:
            return
        with contextlib.suppress(builtins.TimeoutError):
            await workflow.wait_condition(
                lambda: self._abort_reason is not None, timeout=timedelta(seconds=seconds)
            )

    def _carry(self) -> FleetRequest:
        progress = FleetProgress(
            targets=self._targets,
            states=self._states,
            notes=self._notes,
            batch_start=self._batch_start,
            batch_end=self._batch_end,
            batch_number=self._batch_number,
            limits=self._limits,
            paused=self._paused,
            abort_reason=self._abort_reason,
            image_sha256=self._image_sha256,
            runs=self._runs + 1,
            started_at=self._started_at,
        )
        # The selection is in the targets now; carrying it too would double a 10,000-instance payload.
        return self._request.model_copy(update={"carried": progress, "selection": None})

    # ---- one child -----------------------------------------------------------------------------

    async def _rebuild(self, index: int) -> None:
        target = self._targets[index]
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
                    target.instance, target.host, self._image_sha256 or options.image_label
                ),
                static_summary=f"Rebuild {target.instance} on {target.host} (fleet {self._request.name})",
            )
        except WorkflowAlreadyStartedError:
            self._finish(index, InstanceState.SKIPPED, "a rebuild of it was already running")
            return
        self._children[index] = handle
        if self._abort_reason is not None:
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
        if not isinstance(cause, ApplicationError) or not cause.details:
            return InstanceState.FAILED, message
        try:
            result = RebuildResult.model_validate(cause.details[0])
        except ValueError:
            return InstanceState.FAILED, message
        if result.error_type == "Aborted" and result.outcome in (Outcome.ROLLED_BACK, Outcome.UNCHANGED):
            return InstanceState.ABORTED, message
        if result.outcome == Outcome.ROLLED_BACK:
            return InstanceState.ROLLED_BACK, message
        return InstanceState.FAILED, message

    async def _abort_child(self, handle: workflow.ChildWorkflowHandle[object, RebuildResult]) -> None:
        reason = f"fleet {self._request.name} aborted: {self._abort_reason}"[:500]
        # A child that finished meanwhile refuses the signal; its result tells what happened.
        with contextlib.suppress(FailureError):
            await handle.signal(
                ABORT_SIGNAL, AbortRequest(reason=reason, requested_by=f"fleet {self._request.name}")
            )

    def _finish(self, index: int, state: InstanceState, note: str | None) -> None:
        self._children.pop(index, None)
        self._tasks = {t for t in self._tasks if not t.done()}
        self._per_host[self._targets[index].host] -= 1
        self._set_state(index, state)
        if note:
            self._notes[index] = note[:MAX_NOTE]
        if state in FAILURES:
            self._problems.append(index)
        self._poke()

    # ---- before the first rebuild --------------------------------------------------------------

    async def _discover(self, request: FleetRequest) -> None:
        """What each host's worker reports: which instances exist, and the image each one runs."""
        self._phase = FleetPhase.DISCOVER
        selection = request.selection
        assert selection is not None  # checked by the model: only carried runs lack one
        hosts = selection.all_hosts()
        listings = await asyncio.gather(*(self._list_host(host, selection.name_pattern) for host in hosts))
        inventory = {
            host: {e.instance: e for e in listing.instances}
            for host, listing in zip(hosts, listings, strict=True)
        }
        if selection.instances:
            targets = list(selection.instances)
        else:
            # Interleave the hosts, so each batch spreads over them and per-host limits bite less.
            by_host = [sorted(name for name in inventory[h] if selection.matches(name)) for h in hosts]
            targets = [
                FleetTarget(host=host, instance=names[i])
                for i in range(max((len(n) for n in by_host), default=0))
                for host, names in zip(hosts, by_host, strict=True)
                if i < len(names)
            ]
        self._targets = targets
        self._states = [InstanceState.WAITING] * len(targets)
        for index, target in enumerate(targets):
            entry = inventory[target.host].get(target.instance)
            if entry is None:
                self._states[index] = InstanceState.SKIPPED
                self._notes[index] = f"not defined on {target.host}"
            else:
                self._current_images[index] = entry.image_sha256
        self._counts = Counter(self._states)

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
        self._phase = FleetPhase.PREFETCH
        hosts = list(
            dict.fromkeys(
                t.host for t, s in zip(self._targets, self._states, strict=True) if s == InstanceState.WAITING
            )
        )
        digests = await asyncio.gather(*(self._prefetch(request, host) for host in hosts))
        if len(set(digests)) > 1:
            raise ApplicationError(
                "the hosts fetched different images for the same source; nothing was started",
                type="FleetPrefetchFailed",
                non_retryable=True,
            )
        if digests:
            self._image_sha256 = digests[0]

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

    def _skip_current(self) -> None:
        """Re-running a fleet leaves alone what already runs the image."""
        if self._image_sha256 is None:
            return
        for index, current in self._current_images.items():
            if current == self._image_sha256 and self._states[index] == InstanceState.WAITING:
                self._set_state(index, InstanceState.SKIPPED)

    # ---- bookkeeping ---------------------------------------------------------------------------

    def _set_state(self, index: int, state: InstanceState) -> None:
        self._counts[self._states[index]] -= 1
        self._states[index] = state
        self._counts[state] += 1

    def _poke(self) -> None:
        self._changed = True

    def _count(self) -> FleetCounts:
        c = self._counts
        return FleetCounts(
            total=len(self._states),
            waiting=c[InstanceState.WAITING],
            running=c[InstanceState.RUNNING],
            rebuilt=c[InstanceState.REBUILT],
            rolled_back=c[InstanceState.ROLLED_BACK],
            failed=c[InstanceState.FAILED],
            skipped=c[InstanceState.SKIPPED],
            aborted=c[InstanceState.ABORTED],
        )

    def _entry(self, index: int) -> FleetInstance:
        target = self._targets[index]
        return FleetInstance(
            host=target.host,
            instance=target.instance,
            state=self._states[index],
            note=self._notes.get(index),
            workflow_id=rebuild_workflow_id(target.host, target.instance),
        )

    def _publish(self) -> None:
        """The Web UI's current details: counts, progress, what holds the fleet back."""
        c = self._count()
        lines = [
            f"**fleet {self._request.name}**: {self._phase.value}"
            + (" (paused)" if self._paused else "")
            + f", batch {self._batch_number + 1}",
            f"{c.finished} of {c.total} done: {c.rebuilt} rebuilt, {c.rolled_back} rolled back, "
            f"{c.failed} failed, {c.skipped} skipped, {c.aborted} aborted; {c.running} running",
            f"limits: {self._limits.max_unavailable} at once, {self._limits.per_host or '-'} per host, "
            f"{self._limits.max_failures} failures allowed",
        ]
        if self._stop_reason:
            lines.append(f"stopped: {self._stop_reason}")
        workflow.set_current_details("\n\n".join(lines))


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
