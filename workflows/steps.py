"""How the rebuild runs a step: each step's timeouts and retries, and the runner every step goes through.

The runner schedules the step's activity on the instance's host, makes an abort win between steps,
waits for a cancelled activity to really stop (an undo must never race the step it undoes), and keeps
the step's time, the phase's search attribute and the Web UI's details up to date.
"""

from __future__ import annotations

import builtins
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, TypeVar

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.workflow import ActivityCancellationType

from workflows import contract, metrics
from workflows import search_attributes as sa
from workflows.models import Phase
from workflows.rebuild_view import RebuildState

T = TypeVar("T")


@dataclass(frozen=True)
class StepOptions:
    start_to_close: timedelta
    heartbeat: timedelta | None = None
    maximum_attempts: int = 10

    def retry_policy(self) -> RetryPolicy:
        return RetryPolicy(
            initial_interval=timedelta(seconds=1),
            backoff_coefficient=2.0,
            maximum_interval=timedelta(seconds=30),
            maximum_attempts=self.maximum_attempts,
        )


INSPECT = StepOptions(start_to_close=timedelta(seconds=30), maximum_attempts=5)
RESOLVE = StepOptions(start_to_close=timedelta(minutes=1), maximum_attempts=10)
FETCH = StepOptions(start_to_close=timedelta(hours=6), heartbeat=timedelta(seconds=10), maximum_attempts=20)
CHECK = StepOptions(start_to_close=timedelta(minutes=3), heartbeat=timedelta(seconds=10), maximum_attempts=3)
PREPARE = StepOptions(start_to_close=timedelta(minutes=2), heartbeat=timedelta(seconds=10))
# A copy or a volume upload of a large image takes a while; it heartbeats meanwhile.
STAGE = StepOptions(start_to_close=timedelta(hours=2), heartbeat=timedelta(seconds=10))
START = StepOptions(start_to_close=timedelta(minutes=1), heartbeat=timedelta(seconds=10))
# The rebuild has happened by cleanup: like the undos, cleanup is idempotent and must not turn a rebuilt
# instance into a failed rebuild because libvirt was away for a while. It retries without a limit.
CLEANUP = StepOptions(
    start_to_close=timedelta(minutes=1), heartbeat=timedelta(seconds=10), maximum_attempts=0
)
SEED = StepOptions(start_to_close=timedelta(minutes=1))
# A dry run's question to the back end: reads the definition and the disk, writes nothing.
PLAN = StepOptions(start_to_close=timedelta(minutes=1), maximum_attempts=5)
# Compensation must finish whatever happens: it retries without a limit, visibly.
UNDO = StepOptions(start_to_close=timedelta(minutes=2), heartbeat=timedelta(seconds=10), maximum_attempts=0)
IMAGE_STEPS = {Phase.RESOLVE: RESOLVE, Phase.FETCH: FETCH, Phase.CHECK: CHECK}


def stop_options(stop_timeout_seconds: float) -> StepOptions:
    """The graceful part of the stop is the request's; a minute more for the forced one."""
    return StepOptions(timedelta(seconds=stop_timeout_seconds + 60), heartbeat=timedelta(seconds=10))


def swap_options(stop_timeout_seconds: float) -> StepOptions:
    """Stop, prepare and start in one activity: the stop's time, and prepare's and start's on top."""
    return StepOptions(
        timedelta(seconds=stop_timeout_seconds + 60) + PREPARE.start_to_close + START.start_to_close,
        heartbeat=timedelta(seconds=10),
    )


def verify_options(boot_timeout_seconds: float) -> StepOptions:
    return StepOptions(
        timedelta(seconds=boot_timeout_seconds + 30), timedelta(seconds=10), maximum_attempts=3
    )


def preflight_options(boot_timeout_seconds: float) -> StepOptions:
    """Waiting for one of the host's sandbox slots counts too: it heartbeats meanwhile."""
    return StepOptions(
        timedelta(seconds=boot_timeout_seconds + 600), timedelta(seconds=10), maximum_attempts=3
    )


# Nothing on the host has changed yet in these phases: an early `approve` still counts.
APPROVABLE = frozenset(
    {
        Phase.PENDING,
        Phase.INSPECT,
        Phase.RESOLVE,
        Phase.FETCH,
        Phase.CHECK,
        Phase.PREFLIGHT,
        Phase.AWAIT_APPROVAL,
        Phase.PLAN,
    }
)
# Where an abort still means "put everything back"; from cleanup on, the rebuild has happened.
ABORTABLE = APPROVABLE | {
    Phase.STAGE,
    Phase.STOP,
    Phase.PREPARE,
    Phase.SEED,
    Phase.START,
    Phase.VERIFY,
    Phase.CONFIRM_WINDOW,
}


class Aborted(Exception):
    """Raised inside the workflow when an accepted abort must stop the rebuild between steps."""


class StepRunner:
    """Runs the rebuild's steps on its host's queue, one at a time, and the undos after a failure."""

    def __init__(self, state: RebuildState, queue: str) -> None:
        self._state = state
        self._queue = queue
        self._current: workflow.ActivityHandle[Any] | None = None

    def enter(self, phase: Phase) -> None:
        state = self._state
        state.entered(phase, workflow.now())
        request = state.request
        workflow.logger.info(
            "%s on %s: phase %s",
            request.instance,
            request.host,
            phase.value,
            extra={"instance": request.instance, "host": request.host, "phase": phase.value},
        )
        workflow.upsert_search_attributes([sa.REBUILD_PHASE.value_set(phase.value)])
        workflow.set_current_details(state.details())

    async def wait(self, phase: Phase, until: Callable[[], bool], seconds: float) -> bool:
        """Enter ``phase`` and wait for ``until`` or an abort; False when ``seconds`` passed first.
        The phase's time is recorded either way; an abort raises once the wait is over."""
        self.enter(phase)
        began = workflow.now()
        try:
            await workflow.wait_condition(
                lambda: until() or self._state.abort_reason is not None, timeout=timedelta(seconds=seconds)
            )
            met = True
        except builtins.TimeoutError:
            met = False
        finally:
            self._state.step_seconds[phase.value] = (workflow.now() - began).total_seconds()
        if self._state.abort_reason is not None:
            raise Aborted()
        return met

    def cancel_current(self) -> None:
        """An accepted abort cancels the running step; ``run`` then waits until it has stopped."""
        if self._current is not None:
            self._current.cancel()

    def check_abort(self, phase: Phase) -> None:
        if self._state.abort_reason is not None and phase in ABORTABLE:
            raise Aborted()

    async def run(
        self, phase: Phase, activity: contract.HostActivity[Any, T], argument: Any, options: StepOptions
    ) -> T:
        self.check_abort(phase)
        self.enter(phase)
        began = workflow.now()
        # Wait for a cancelled activity to really stop: an undo must never race the step it undoes.
        self._current = activity.start(
            argument,
            task_queue=self._queue,
            start_to_close_timeout=options.start_to_close,
            heartbeat_timeout=options.heartbeat,
            retry_policy=options.retry_policy(),
            cancellation_type=ActivityCancellationType.WAIT_CANCELLATION_COMPLETED,
            summary=f"{phase.value}: {self._state.request.instance}",
        )
        try:
            result: T = await self._current
        except GeneratorExit:
            # The worker dropped this run (terminated, reset, evicted): there is no clock to read.
            raise
        except BaseException:
            self._end_step(phase, began)
            raise
        self._end_step(phase, began)
        # An abort that came while the step finished anyway still wins.
        self.check_abort(phase)
        return result

    async def undo(self, activity: contract.HostActivity[Any, Any], argument: Any) -> None:
        await activity.start(
            argument,
            task_queue=self._queue,
            start_to_close_timeout=UNDO.start_to_close,
            heartbeat_timeout=UNDO.heartbeat,
            retry_policy=UNDO.retry_policy(),
            summary=f"rollback: {self._state.request.instance}",
        )

    def _end_step(self, phase: Phase, began: datetime) -> None:
        self._current = None
        elapsed = (workflow.now() - began).total_seconds()
        self._state.add_seconds(phase.value, elapsed)
        # A dry run is no rebuild: its steps stay out of the rebuilds' step times.
        if not self._state.request.dry_run:
            metrics.step_finished(self._state.request.host, phase.value, elapsed)
