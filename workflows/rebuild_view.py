"""What a rebuild says about itself: its status query, its result, and its text in the Web UI.

``RebuildState`` is what the rebuild knows so far (phase, timings, errors, what the steps reported);
the workflow and its step runner write it, and everything people and scripts read is made from it here.
Pure: no commands, safe in the sandbox.
"""

from __future__ import annotations

import asyncio
from datetime import datetime

from temporalio.exceptions import ApplicationError, CancelledError, TimeoutError

from workflows.activity_models import StopMethod
from workflows.image_steps import NewImage
from workflows.models import Outcome, Phase, PhaseEntered, RebuildRequest, RebuildResult, RebuildStatus
from workflows.plan_models import RebuildPlan
from workflows.ui_text import escape_markdown, shown_image

OUTCOME_WORDS = {
    Outcome.REBUILT: "rebuilt",
    Outcome.ROLLED_BACK: "rolled back",
    Outcome.UNCHANGED: "failed, nothing changed",
    Outcome.ROLLBACK_FAILED: "rollback FAILED, manual attention needed",
    Outcome.PLANNED: "planned (dry run), nothing changed",
}
# What the status says in words, where the phase alone could mislead an operator.
SUMMARY = {
    Phase.CONFIRM_WINDOW: "new disk running; the old one is kept until confirm, revert or the window's end",
    Phase.CLEANUP: "rebuilt, cleanup pending",
    Phase.ROLLBACK: "rolling back to the old root disk",
    Phase.DONE: "rebuilt",
    Phase.ROLLED_BACK: "rolled back to the old root disk",
    Phase.PLANNED: "dry run: planned, nothing changed; the plan says what a real run would change",
}


class RebuildState:
    """What a rebuild knows about itself so far, as status, result and the Web UI show it."""

    def __init__(self, request: RebuildRequest) -> None:
        self.request = request
        self.phase = Phase.PENDING
        # Read only by the status query: keeping it adds no command to the history.
        self.phases: list[PhaseEntered] = []
        self.step_seconds: dict[str, float] = {}
        # What the steps found out.
        self.rebuild_id: str | None = None
        self.image_sha256: str | None = request.sha256
        self.identity: str | None = None
        self.stopped_by: StopMethod | None = None
        self.verified_by: str | None = None
        self.disk_mode: str | None = None
        # What went wrong, what came out of turn (signals ignored, with why), what was undone.
        self.last_error: str | None = None
        self.last_error_type: str | None = None
        self.cleanup_error: str | None = None
        self.abort_reason: str | None = None
        self.ignored_signals: list[str] = []
        self.undone: list[str] = []
        # What the rebuild waits for, until when; and, once over, how it ended.
        self.approval_deadline: datetime | None = None
        self.confirm_deadline: datetime | None = None
        self.graceful_stop_deadline: datetime | None = None
        self.outcome: Outcome | None = None
        self.downtime_seconds: float | None = None
        # A dry run's plan, once made.
        self.plan: RebuildPlan | None = None

    def entered(self, phase: Phase, at: datetime) -> None:
        """The phase is now ``phase``; a step run again in the same phase (cleanup's) is one entry."""
        self.phase = phase
        if not self.phases or self.phases[-1].phase != phase:
            self.phases.append(PhaseEntered(phase=phase, at=at))

    def add_seconds(self, key: str, seconds: float) -> None:
        self.step_seconds[key] = self.step_seconds.get(key, 0.0) + seconds

    def ignore(self, signal: str, why: str) -> None:
        self.ignored_signals.append(f"{signal} in phase {self.phase.value} ignored: {why}")

    def status(self, undo_stack: list[str], started_at: datetime) -> RebuildStatus:
        summary = SUMMARY.get(self.phase)
        if self.cleanup_error is not None:
            summary = f"rebuilt; cleanup failed: {self.cleanup_error}"
        return RebuildStatus(
            instance=self.request.instance,
            host=self.request.host,
            phase=self.phase,
            image_url=self.request.image_label,
            image_sha256=self.image_sha256,
            step_seconds=dict(self.step_seconds),
            undo_stack=undo_stack,
            last_error=self.last_error,
            started_at=started_at,
            abort_reason=self.abort_reason,
            ignored_signals=list(self.ignored_signals),
            summary=summary,
            rebuild_id=self.rebuild_id,
            identity=self.identity,
            verify=self.request.verify or "default",
            stopped_by=self.stopped_by,
            verified_by=self.verified_by,
            disk_mode=self.disk_mode,
            approval_deadline=self.approval_deadline,
            confirm_deadline=self.confirm_deadline,
            outcome=self.outcome,
            downtime_seconds=self.downtime_seconds,
            plan=self.plan,
            phases=list(self.phases),
            graceful_stop_deadline=self.graceful_stop_deadline if self.phase == Phase.STOP else None,
        )

    def rebuilt(self, image: NewImage, downtime: float | None, forced_stop: bool) -> RebuildResult:
        return RebuildResult(
            instance=self.request.instance,
            host=self.request.host,
            outcome=Outcome.REBUILT,
            image_sha256=image.checked.sha256,
            image_format=image.checked.format,
            step_seconds=dict(self.step_seconds),
            downtime_seconds=downtime,
            forced_stop=forced_stop,
            cleanup_error=self.cleanup_error,
            stopped_by=self.stopped_by,
            verified_by=self.verified_by,
            disk_mode=self.disk_mode,
            image_url=self.request.image_label,
        )

    def planned(self, image: NewImage, plan: RebuildPlan) -> RebuildResult:
        """A dry run's result: its plan, and nothing done."""
        return RebuildResult(
            instance=self.request.instance,
            host=self.request.host,
            outcome=Outcome.PLANNED,
            image_sha256=image.checked.sha256,
            image_format=image.checked.format,
            step_seconds=dict(self.step_seconds),
            disk_mode=self.disk_mode,
            image_url=self.request.image_label,
            plan=plan,
        )

    def not_rebuilt(self, outcome: Outcome, failed_step: Phase) -> RebuildResult:
        return RebuildResult(
            instance=self.request.instance,
            host=self.request.host,
            outcome=outcome,
            image_sha256=self.image_sha256,
            failed_step=failed_step,
            error=self.last_error,
            error_type=self.last_error_type,
            step_seconds=dict(self.step_seconds),
            undone=list(self.undone),
            stopped_by=self.stopped_by,
            verified_by=self.verified_by,
            disk_mode=self.disk_mode,
            image_url=self.request.image_label,
        )

    def details(self) -> str:
        """The Web UI's current details: where the rebuild is, how long each step took, what failed."""
        request = self.request
        # Markdown from requests and errors is escaped, a signed URL's credential left out (ui_text).
        lines = [
            f"**{escape_markdown(request.instance)}** on {escape_markdown(request.host)}: "
            f"phase **{self.phase.value}**",
            f"image: {escape_markdown(shown_image(request.image_label))}",
        ]
        if self.outcome is not None:
            ended = f"outcome: **{OUTCOME_WORDS[self.outcome]}**"
            if self.downtime_seconds is not None:
                ended += f", instance down {self.downtime_seconds:.2f} s"
            lines.append(ended)
        if self.phase == Phase.AWAIT_APPROVAL and self.approval_deadline is not None:
            lines.append(f"waiting for approve until {_utc(self.approval_deadline)}, then fails unchanged")
        if self.phase == Phase.CONFIRM_WINDOW and self.confirm_deadline is not None:
            default = "revert" if request.revert_by_default else "confirm"
            lines.append(
                f"waiting for confirm or revert until {_utc(self.confirm_deadline)}, then {default}s"
            )
        if self.plan is not None:
            disk = self.plan.root_disk
            lines.append(
                escape_markdown(f"plan: root disk {disk.target} ({disk.kind}, {disk.format}) by {disk.mode}")
            )
        if self.step_seconds:
            timings = ", ".join(f"{k} {v:.2f}s" for k, v in self.step_seconds.items())
            lines.append(f"steps: {timings}")
        if self.identity:
            lines.append(f"identity: {escape_markdown(self.identity)}")
        stop = f"stopped by {self.stopped_by}" if self.stopped_by else "stop: ACPI, agent, then forced"
        verify = f"verified by {self.verified_by}" if self.verified_by else f"verify: {self._verify_label()}"
        lines.append(escape_markdown(f"{stop}; {verify}"))
        if self.last_error:
            lines.append(f"error: {escape_markdown(self.last_error)}")
        return "\n\n".join(lines)

    def _verify_label(self) -> str:
        if self.request.verify is not None:
            return self.request.verify
        if self.request.boot_marker is not None:
            return f"marker:{self.request.boot_marker}"
        return "default (agent if the domain has its channel, else running)"


def describe(err: BaseException) -> tuple[str, str]:
    """The innermost message and type worth showing: the activity's own error, not its wrapper."""
    message, kind = str(err), type(err).__name__
    current: BaseException | None = err
    while current is not None:
        if isinstance(current, ApplicationError):
            message, kind = current.message, current.type or kind
        elif isinstance(current, TimeoutError):
            message, kind = f"{current.message} ({current.type.name if current.type else ''})", "Timeout"
        elif isinstance(current, CancelledError | asyncio.CancelledError):
            message, kind = "cancelled", "Cancelled"
        current = current.__cause__
    return message or kind, kind


def _utc(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")
