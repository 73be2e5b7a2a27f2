"""The rebuild's undo stack, and the three ways a rebuild that does not finish ends.

Every step that changes the host pushes its undo before it acts, so a crash in the middle of the step
is undone too (samples-python's saga registers compensations the same way). When the rebuild fails,
is aborted, reverted or cancelled, :meth:`Saga.fail` runs the undos in reverse and ends the workflow
with one of:

- ``RebuildFailed``: nothing was changed (no undo was pushed yet, or only undos that tidy the host);
- ``RebuildRolledBack``: every undo ran; the instance is back on its old root disk;
- ``RollbackFailed``: an undo failed for good; the rest are not tried (each may depend on the one before),
  and the old disk stays as a backup next to the disk for a person to look at.

Each carries the ``RebuildResult`` as its detail, for the CLI, the API and a fleet to read.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, NoReturn

from temporalio import workflow
from temporalio.exceptions import ActivityError, ApplicationError

from workflows import metrics
from workflows.models import Outcome, Phase
from workflows.rebuild_view import RebuildState, describe
from workflows.steps import StepRunner

# The three endings: the phase each leaves the rebuild in, and its error type.
ENDINGS = {
    Outcome.UNCHANGED: (Phase.FAILED, "RebuildFailed"),
    Outcome.ROLLED_BACK: (Phase.ROLLED_BACK, "RebuildRolledBack"),
    Outcome.ROLLBACK_FAILED: (Phase.FAILED, "RollbackFailed"),
}


class Reverted(Exception):
    """Raised when the confirm window ends in a revert: the undos put the old disk back."""


@dataclass(frozen=True)
class Undo:
    name: str
    action: Callable[[], Awaitable[Any]]
    # It only tidies the host (a staged disk beside the old one): the instance itself was not changed.
    tidy: bool = False


class Saga:
    def __init__(self, state: RebuildState, steps: StepRunner) -> None:
        self._state = state
        self._steps = steps
        self._undos: list[Undo] = []

    def push(self, name: str, action: Callable[[], Awaitable[Any]], tidy: bool = False) -> None:
        """Register an undo before the step it undoes acts: a crash mid-step still gets undone."""
        self._undos.append(Undo(name, action, tidy))

    def clear(self) -> None:
        """The new disk is in place and verified: from here on nothing is undone."""
        self._undos.clear()

    def names(self) -> list[str]:
        return [undo.name for undo in self._undos]

    async def fail(self, err: BaseException) -> NoReturn:
        """Run the undos in reverse, then fail with what failed and what state the instance is in."""
        state = self._state
        failed_step = state.phase
        if state.abort_reason is not None:
            state.last_error, state.last_error_type = f"aborted: {state.abort_reason}", "Aborted"
        elif isinstance(err, Reverted):
            state.last_error, state.last_error_type = f"reverted: {err}", "Reverted"
        else:
            state.last_error, state.last_error_type = describe(err)
        if not self._undos:
            raise self._end(
                Outcome.UNCHANGED, failed_step, f"{state.last_error}; nothing was changed"
            ) from None
        changed = not all(undo.tidy for undo in self._undos)
        self._steps.enter(Phase.ROLLBACK)
        while self._undos:
            undo = self._undos.pop()
            began = workflow.now()
            try:
                await undo.action()
            except ActivityError as undo_err:
                # Only a non-retryable error gets here (undos retry without limit): stop, because
                # the next undo may assume this one worked; a person has to look.
                reason, _ = describe(undo_err)
                state.last_error = f"{state.last_error}; rollback step '{undo.name}' failed: {reason}"
                raise self._end(
                    Outcome.ROLLBACK_FAILED,
                    failed_step,
                    f"its rollback failed at '{undo.name}': {reason}; the old root disk is kept as a "
                    "backup next to the disk; manual attention needed",
                ) from None
            state.undone.append(undo.name)
            state.add_seconds(Phase.ROLLBACK.value, (workflow.now() - began).total_seconds())
        if not changed:
            raise self._end(
                Outcome.UNCHANGED, failed_step, f"{state.last_error}; nothing was changed"
            ) from None
        raise self._end(
            Outcome.ROLLED_BACK,
            failed_step,
            f"{state.last_error}; the instance was rolled back to its old root disk",
        ) from None

    def _end(self, outcome: Outcome, failed_step: Phase, what: str) -> ApplicationError:
        """Enter the ending's phase; the error to fail the workflow with, the result as its detail."""
        phase, error_type = ENDINGS[outcome]
        self._state.outcome = outcome
        request = self._state.request
        seconds = (workflow.now() - workflow.info().start_time).total_seconds()
        if not request.dry_run:
            metrics.rebuild_finished(request.host, outcome, seconds, None)
        self._steps.enter(phase)
        # "failed at X: error; ..." or, when the rollback failed too, "failed at X and its rollback ...".
        joint = " and " if outcome == Outcome.ROLLBACK_FAILED else ": "
        return ApplicationError(
            f"rebuild of {self._state.request.instance} failed at {failed_step.value}{joint}{what}",
            self._state.not_rebuilt(outcome, failed_step),
            type=error_type,
            non_retryable=True,
        )
