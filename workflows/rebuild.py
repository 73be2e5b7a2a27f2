"""The RebuildInstance workflow: orchestration only, every side effect is an activity on the host.

Order: inspect -> fetch -> check (while the instance still runs) -> stop -> prepare -> start -> verify
-> cleanup. Unlike Nova, the download happens before the stop, so the instance is down only for the
few activities that must run while it is off. Every step that changes the host pushes its undo before
it acts; a step that fails for good, or a cancellation, runs the undos in reverse.
"""

from __future__ import annotations

import asyncio
import builtins
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, TypeVar

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError, CancelledError, TimeoutError
from temporalio.workflow import ActivityCancellationType

with workflow.unsafe.imports_passed_through():
    from activities.disks import DiskActivities
    from activities.glance import GlanceActivities
    from activities.hypervisor import HypervisorActivities
    from activities.images import ImageActivities
    from activities.preflight import PreflightActivities
    from activities.seed import SeedActivities
    from workflows import search_attributes as sa
    from workflows.models import (
        ABORT_SIGNAL,
        ABORT_UPDATE,
        APPROVE_SIGNAL,
        CONFIRM_SIGNAL,
        REVERT_SIGNAL,
        STATUS_QUERY,
        WORKFLOW_NAME,
        AbortAnswer,
        AbortRequest,
        CachedImage,
        CheckedImage,
        CheckImageInput,
        Decision,
        FetchImageInput,
        InspectInstanceInput,
        InstanceInfo,
        Outcome,
        Phase,
        PreflightInput,
        PrepareRootDiskInput,
        PrepareSeedInput,
        RebuildRequest,
        RebuildResult,
        RebuildStatus,
        RecordImageInput,
        RemoveBackupInput,
        RemoveSeedBackupInput,
        ResolvedImage,
        ResolveGlanceImageInput,
        RestoreRootDiskInput,
        RestoreSeedInput,
        StartInstanceInput,
        StopInstanceInput,
        StopMethod,
        StopResult,
        VerifyInstanceInput,
        host_task_queue,
    )

T = TypeVar("T")

# Qcow2 metadata can make a file a little larger than its virtual size; allow that much more.
DOWNLOAD_SLACK_BYTES = 64 << 20


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


# Steps where an abort still means "put everything back"; from cleanup on, the rebuild has happened.
ABORTABLE = frozenset(
    {
        Phase.PENDING,
        Phase.INSPECT,
        Phase.RESOLVE,
        Phase.FETCH,
        Phase.CHECK,
        Phase.PREFLIGHT,
        Phase.AWAIT_APPROVAL,
        Phase.STOP,
        Phase.PREPARE,
        Phase.SEED,
        Phase.START,
        Phase.VERIFY,
        Phase.CONFIRM_WINDOW,
    }
)
# Where an early `approve` still counts: before and while the rebuild waits for it.
APPROVABLE = frozenset(
    {
        Phase.PENDING,
        Phase.INSPECT,
        Phase.RESOLVE,
        Phase.FETCH,
        Phase.CHECK,
        Phase.PREFLIGHT,
        Phase.AWAIT_APPROVAL,
    }
)

INSPECT = StepOptions(start_to_close=timedelta(seconds=30), maximum_attempts=5)
RESOLVE = StepOptions(start_to_close=timedelta(minutes=1), maximum_attempts=10)
FETCH = StepOptions(start_to_close=timedelta(hours=6), heartbeat=timedelta(seconds=10), maximum_attempts=20)
CHECK = StepOptions(start_to_close=timedelta(minutes=3), heartbeat=timedelta(seconds=10), maximum_attempts=3)
PREPARE = StepOptions(start_to_close=timedelta(minutes=2), heartbeat=timedelta(seconds=10))
START = StepOptions(start_to_close=timedelta(minutes=1), heartbeat=timedelta(seconds=10))
# The rebuild has happened by cleanup: like the undos, cleanup is idempotent and must not turn a rebuilt
# instance into a failed rebuild because libvirt was away for a while. It retries without a limit.
CLEANUP = StepOptions(start_to_close=timedelta(minutes=1), maximum_attempts=0)
SEED = StepOptions(start_to_close=timedelta(minutes=1))
# Compensation must finish whatever happens: it retries without a limit, visibly.
UNDO = StepOptions(start_to_close=timedelta(minutes=2), heartbeat=timedelta(seconds=10), maximum_attempts=0)


# What the status says in words, where the phase alone could mislead an operator.
SUMMARY = {
    Phase.CONFIRM_WINDOW: "new disk running; the old one is kept until confirm, revert or the window's end",
    Phase.CLEANUP: "rebuilt, cleanup pending",
    Phase.ROLLBACK: "rolling back to the old root disk",
    Phase.DONE: "rebuilt",
    Phase.ROLLED_BACK: "rolled back to the old root disk",
}
# Patch IDs: each guards a change of the workflow's commands, so rebuilds started on older code replay.
PATCH_REBUILD_ID = "rebuild-id-survives-reset"
PATCH_CLEANUP_NEVER_FAILS = "cleanup-never-fails-a-rebuild"


class _Aborted(Exception):
    """Raised inside the workflow when an accepted abort must stop the rebuild between steps."""


class _Reverted(Exception):
    """Raised when the confirm window ends in a revert: the undos put the old disk back."""


class _Undo:
    def __init__(self, name: str, action: Callable[[], Awaitable[Any]]) -> None:
        self.name = name
        self.action = action


@dataclass(frozen=True)
class _NewImage:
    """What fetch and check found: the image to put under the instance, and where it came from."""

    source: ResolvedImage
    cached: CachedImage
    checked: CheckedImage


@workflow.defn(name=WORKFLOW_NAME)
class RebuildInstance:
    @workflow.init
    def __init__(self, request: RebuildRequest) -> None:
        self._request = request
        self._queue = host_task_queue(request.host)
        self._phase = Phase.PENDING
        self._step_seconds: dict[str, float] = {}
        self._undo: list[_Undo] = []
        self._undone: list[str] = []
        self._last_error: str | None = None
        self._last_error_type: str | None = None
        self._image_sha256: str | None = request.sha256
        self._current: workflow.ActivityHandle[Any] | None = None
        self._abort_reason: str | None = None
        self._ignored_signals: list[str] = []
        self._approved_by: str | None = None
        self._decision: tuple[str, str] | None = None
        self._rebuild_id: str | None = None
        self._cleanup_error: str | None = None
        self._identity: str | None = None
        self._stopped_by: StopMethod | None = None
        self._verified_by: str | None = None

    @workflow.query(name=STATUS_QUERY)
    def status(self) -> RebuildStatus:
        summary = SUMMARY.get(self._phase)
        if self._cleanup_error is not None:
            summary = f"rebuilt; cleanup failed: {self._cleanup_error}"
        return RebuildStatus(
            instance=self._request.instance,
            host=self._request.host,
            phase=self._phase,
            image_url=self._request.image_label,
            image_sha256=self._image_sha256,
            step_seconds=dict(self._step_seconds),
            undo_stack=[undo.name for undo in self._undo],
            last_error=self._last_error,
            started_at=workflow.info().start_time,
            abort_reason=self._abort_reason,
            ignored_signals=list(self._ignored_signals),
            summary=summary,
            rebuild_id=self._rebuild_id,
            identity=self._identity,
            verify=self._request.verify or "default",
            stopped_by=self._stopped_by,
            verified_by=self._verified_by,
        )

    @workflow.signal(name=ABORT_SIGNAL)
    def abort(self, request: AbortRequest) -> None:
        """Stop the rebuild and put the instance back, if it is not too late (see ``abort_rebuild``)."""
        self._try_abort(request)

    @workflow.update(name=ABORT_UPDATE)
    def abort_rebuild(self, request: AbortRequest) -> AbortAnswer:
        """The same as the ``abort`` signal, but the caller learns whether it was accepted."""
        return self._try_abort(request)

    @workflow.signal(name=APPROVE_SIGNAL)
    def approve(self, decision: Decision) -> None:
        """Let a rebuild that asked for approval go on to stop the instance."""
        if not self._request.require_approval:
            self._ignore("approve", "this rebuild does not wait for approval")
        elif self._phase not in APPROVABLE:
            self._ignore("approve", "the rebuild is past its approval")
        elif self._approved_by is None:
            self._approved_by = decision.requested_by

    @workflow.signal(name=CONFIRM_SIGNAL)
    def confirm(self, decision: Decision) -> None:
        """Keep the new disk now: the backup of the old one is removed."""
        self._decide("confirm", decision)

    @workflow.signal(name=REVERT_SIGNAL)
    def revert(self, decision: Decision) -> None:
        """Put the old disk back; the instance boots its old image again."""
        self._decide("revert", decision)

    def _decide(self, verdict: str, decision: Decision) -> None:
        if self._phase != Phase.CONFIRM_WINDOW:
            self._ignore(verdict, "only meaningful in the confirm window")
        elif self._decision is not None:
            self._ignore(verdict, f"already decided: {self._decision[0]}")
        else:
            self._decision = (verdict, f"{decision.reason or verdict} (by {decision.requested_by})")

    def _ignore(self, signal: str, why: str) -> None:
        self._ignored_signals.append(f"{signal} in phase {self._phase.value} ignored: {why}")

    def _try_abort(self, request: AbortRequest) -> AbortAnswer:
        if self._abort_reason is not None:
            message = f"already aborting: {self._abort_reason}"
        elif self._phase not in ABORTABLE:
            over = "the new disk is in place and verified" if self._phase == Phase.CLEANUP else "it is over"
            message = f"too late to abort in phase {self._phase.value}: {over}"
        else:
            self._abort_reason = f"{request.reason} (by {request.requested_by})"
            if self._current is not None:
                self._current.cancel()
            return AbortAnswer(accepted=True, phase=self._phase, message="abort accepted")
        self._ignore("abort", message)
        return AbortAnswer(accepted=False, phase=self._phase, message=message)

    @workflow.run
    async def run(self, request: RebuildRequest) -> RebuildResult:
        """The rebuild's steps; any failure, abort or cancellation before cleanup runs the undos."""
        self._rebuild_id = _rebuild_id()
        _count("rebuilds_started")
        try:
            instance = await self._inspect(request)
            image = await self._fetch_and_check(request)
            await self._preflight(request, instance, image)
            if request.require_approval:
                await self._await_approval(request)
            stopped = await self._stop(request, instance)
            await self._prepare(instance, image)
            seeded = await self._seed(request, instance)
            downtime = await self._start_and_verify(request, instance, stopped, image)
            if request.confirm_within_seconds is not None:
                await self._confirm_window(request.confirm_within_seconds, request.revert_by_default)
        except (
            ActivityError,
            ApplicationError,
            CancelledError,
            asyncio.CancelledError,
            _Aborted,
            _Reverted,
        ) as err:
            await self._fail(err)
            raise AssertionError("unreachable") from None
        # The new disk is in place and verified: from here on nothing is undone.
        self._undo.clear()
        await self._clean_up(instance, image, seeded)
        self._enter(Phase.DONE)
        _count("rebuilds_finished")
        return RebuildResult(
            instance=request.instance,
            host=request.host,
            outcome=Outcome.REBUILT,
            image_sha256=image.checked.sha256,
            image_format=image.checked.format,
            step_seconds=dict(self._step_seconds),
            downtime_seconds=downtime,
            forced_stop=stopped.forced,
            cleanup_error=self._cleanup_error,
            stopped_by=self._stopped_by,
            verified_by=self._verified_by,
        )

    async def _inspect(self, request: RebuildRequest) -> InstanceInfo:
        return await self._step(
            Phase.INSPECT,
            HypervisorActivities.inspect_instance,
            InspectInstanceInput(
                instance=request.instance,
                root_disk=request.root_disk,
                discard_snapshots=request.discard_snapshots,
            ),
            INSPECT,
        )

    async def _fetch_and_check(self, request: RebuildRequest) -> _NewImage:
        """Download and check the image while the instance still runs: nothing changes on it yet."""
        source = await self._image_source(request)
        cached = await self._step(
            Phase.FETCH,
            ImageActivities.fetch_image,
            FetchImageInput(
                url=source.url,
                sha256=source.sha256,
                sha512=source.sha512,
                max_bytes=request.max_virtual_size_bytes + DOWNLOAD_SLACK_BYTES,
            ),
            FETCH,
        )
        self._image_sha256 = cached.sha256
        if workflow.patched("image-id-after-fetch"):
            workflow.upsert_search_attributes([sa.IMAGE_ID.value_set(cached.sha256)])
        checked = await self._step(
            Phase.CHECK,
            ImageActivities.check_image,
            CheckImageInput(
                sha256=cached.sha256,
                max_virtual_size_bytes=request.max_virtual_size_bytes,
                declared_format=source.disk_format,
            ),
            CHECK,
        )
        return _NewImage(source, cached, checked)

    async def _preflight(self, request: RebuildRequest, instance: InstanceInfo, image: _NewImage) -> None:
        """Boot the new image in a sandbox while the instance still runs: a broken one costs no downtime.

        Only rebuilds that ask for it (or whose host worker does by default) have this step: histories
        from before it replay unchanged.
        """
        wanted = instance.preflight_by_default if request.preflight is None else request.preflight
        if not wanted:
            return
        assert self._rebuild_id is not None
        await self._step(
            Phase.PREFLIGHT,
            PreflightActivities.preflight_image,
            PreflightInput(
                instance=request.instance,
                rebuild_id=self._rebuild_id,
                image_sha256=image.checked.sha256,
                image_format=image.checked.format,
                image_virtual_size=image.checked.virtual_size,
                min_virtual_size=image.source.min_disk_bytes,
                verify=request.verify,
                boot_marker=request.boot_marker,
                boot_timeout_seconds=request.boot_timeout_seconds,
                change=request.identity,
                root_disk_target=instance.root_disk_target,
            ),
            StepOptions(
                # Waiting for a sandbox slot counts too: it heartbeats meanwhile.
                start_to_close=timedelta(seconds=request.boot_timeout_seconds + 600),
                heartbeat=timedelta(seconds=10),
                maximum_attempts=3,
            ),
        )

    async def _stop(self, request: RebuildRequest, instance: InstanceInfo) -> StopResult:
        if instance.was_running:
            self._push("start instance again", self._undo_stop)
        stopped = await self._step(
            Phase.STOP,
            HypervisorActivities.stop_instance,
            StopInstanceInput(instance=request.instance, timeout_seconds=request.stop_timeout_seconds),
            StepOptions(
                start_to_close=timedelta(seconds=request.stop_timeout_seconds + 60),
                heartbeat=timedelta(seconds=10),
            ),
        )
        self._stopped_by = stopped.stopped_by
        return stopped

    async def _prepare(self, instance: InstanceInfo, image: _NewImage) -> None:
        """The old disk becomes the backup, named by the rebuild ID: the undo finds it even after a reset."""
        assert self._rebuild_id is not None
        restore = RestoreRootDiskInput(
            instance=self._request.instance,
            rebuild_id=self._rebuild_id,
            original_format=instance.root_disk_format,
            image_sha256=image.checked.sha256,
            root_disk_target=instance.root_disk_target,
        )
        self._push("restore old root disk", lambda: self._undo_prepare(restore))
        await self._step(
            Phase.PREPARE,
            DiskActivities.prepare_root_disk,
            PrepareRootDiskInput(
                instance=self._request.instance,
                image_sha256=image.checked.sha256,
                image_format=image.checked.format,
                image_virtual_size=image.checked.virtual_size,
                original_format=instance.root_disk_format,
                rebuild_id=self._rebuild_id,
                min_virtual_size=image.source.min_disk_bytes,
                max_virtual_size=self._request.max_virtual_size_bytes,
                discard_snapshots=self._request.discard_snapshots,
                root_disk_target=instance.root_disk_target,
            ),
            PREPARE,
        )

    async def _seed(self, request: RebuildRequest, instance: InstanceInfo) -> bool:
        """A new cloud-init seed and identity while the instance is off; its undo puts the old back.

        Only rebuilds that give the guest an identity, or of instances that have one, have this step:
        histories from before it replay unchanged.
        """
        if request.identity is None and not instance.has_identity:
            return False
        assert self._rebuild_id is not None
        restore = RestoreSeedInput(
            instance=request.instance, rebuild_id=self._rebuild_id, root_disk_target=instance.root_disk_target
        )
        self._push("restore old seed", lambda: self._undo_activity(SeedActivities.restore_seed, restore))
        seeded = await self._step(
            Phase.SEED,
            SeedActivities.prepare_seed,
            PrepareSeedInput(
                instance=request.instance,
                rebuild_id=self._rebuild_id,
                change=request.identity,
                root_disk_target=instance.root_disk_target,
            ),
            SEED,
        )
        self._identity = seeded.summary
        return True

    async def _start_and_verify(
        self, request: RebuildRequest, instance: InstanceInfo, stopped: StopResult, image: _NewImage
    ) -> float | None:
        """Boot the new disk where the instance should run; returns the downtime, if it was running."""
        should_start = instance.was_running if request.start_after is None else request.start_after
        if not should_start:
            return None
        self._push("stop instance on new disk", self._undo_start)
        started = await self._step(
            Phase.START,
            HypervisorActivities.start_instance,
            StartInstanceInput(instance=request.instance),
            START,
        )
        verified = await self._step(
            Phase.VERIFY,
            HypervisorActivities.verify_instance,
            VerifyInstanceInput(
                instance=request.instance,
                boot_marker=request.boot_marker,
                boot_timeout_seconds=request.boot_timeout_seconds,
                console_offset=stopped.console_offset,
                verify=request.verify,
                root_disk_target=instance.root_disk_target,
                image_sha256=image.checked.sha256,
            ),
            StepOptions(
                start_to_close=timedelta(seconds=request.boot_timeout_seconds + 30),
                heartbeat=timedelta(seconds=10),
                maximum_attempts=3,
            ),
        )
        # None in histories from before verify reported how it verified.
        self._verified_by = verified.verified_by if verified is not None else None
        if not instance.was_running:
            return None
        return (started.started_at - stopped.stopped_at).total_seconds()

    async def _clean_up(self, instance_info: InstanceInfo, image: _NewImage, seeded: bool) -> None:
        """Drop the backup and record the new image. Retried without a limit; an error no retry can
        fix (the instance was undefined meanwhile) is reported with the result, not as a failure."""
        assert self._rebuild_id is not None
        instance = self._request.instance
        try:
            await self._step(
                Phase.CLEANUP,
                DiskActivities.remove_backup,
                RemoveBackupInput(
                    instance=instance,
                    rebuild_id=self._rebuild_id,
                    root_disk_target=instance_info.root_disk_target,
                    discard_snapshots=self._request.discard_snapshots,
                ),
                CLEANUP,
            )
            if seeded:
                await self._step(
                    Phase.CLEANUP,
                    SeedActivities.remove_seed_backup,
                    RemoveSeedBackupInput(
                        instance=instance,
                        rebuild_id=self._rebuild_id,
                        root_disk_target=instance_info.root_disk_target,
                    ),
                    CLEANUP,
                )
            await self._step(
                Phase.CLEANUP,
                HypervisorActivities.record_image,
                RecordImageInput(
                    instance=instance,
                    image_sha256=image.checked.sha256,
                    image_url=image.source.url,
                    rebuilt_at=workflow.now(),
                ),
                CLEANUP,
            )
        except ActivityError as err:
            if not workflow.patched(PATCH_CLEANUP_NEVER_FAILS):
                raise
            self._cleanup_error, _ = describe(err)

    async def _await_approval(self, request: RebuildRequest) -> None:
        """Nothing has changed yet; without an approval in time, nothing will."""
        self._enter(Phase.AWAIT_APPROVAL)
        began = workflow.now()
        try:
            await workflow.wait_condition(
                lambda: self._approved_by is not None or self._abort_reason is not None,
                timeout=timedelta(seconds=request.approval_timeout_seconds),
            )
        except builtins.TimeoutError:
            raise ApplicationError(
                f"no approval within {request.approval_timeout_seconds:g} s",
                type="ApprovalTimeout",
                non_retryable=True,
            ) from None
        finally:
            self._step_seconds[Phase.AWAIT_APPROVAL.value] = (workflow.now() - began).total_seconds()
        if self._abort_reason is not None:
            raise _Aborted()

    async def _confirm_window(self, seconds: float, revert_by_default: bool) -> None:
        """The new image runs; the old disk waits as a backup for `confirm`, `revert` or the end."""
        self._enter(Phase.CONFIRM_WINDOW)
        began = workflow.now()
        try:
            await workflow.wait_condition(
                lambda: self._decision is not None or self._abort_reason is not None,
                timeout=timedelta(seconds=seconds),
            )
        except builtins.TimeoutError:
            verdict = "revert" if revert_by_default else "confirm"
            self._decision = (verdict, f"{verdict} by default: the {seconds:g} s window ended")
        finally:
            self._step_seconds[Phase.CONFIRM_WINDOW.value] = (workflow.now() - began).total_seconds()
        if self._abort_reason is not None:
            raise _Aborted()
        assert self._decision is not None
        if self._decision[0] == "revert":
            raise _Reverted(self._decision[1])

    async def _image_source(self, request: RebuildRequest) -> ResolvedImage:
        """Where the image comes from and what it must be: the request, or its Glance record.

        Replay-safe without a patch marker: only requests naming a Glance image, which no earlier
        history holds, schedule the extra activity.
        """
        if request.glance_image_id is None or request.glance_url is None:
            assert request.image_url is not None
            return ResolvedImage(
                url=request.image_url,
                sha256=request.sha256,
                sha512=request.sha512,
                disk_format=request.disk_format,
            )
        record = await self._step(
            Phase.RESOLVE,
            GlanceActivities.resolve_glance_image,
            ResolveGlanceImageInput(
                glance_url=request.glance_url,
                image_id=request.glance_image_id,
                max_virtual_size_bytes=request.max_virtual_size_bytes,
            ),
            RESOLVE,
        )
        if request.disk_format and request.disk_format != record.disk_format:
            raise ApplicationError(
                f"Glance says image {request.glance_image_id} is {record.disk_format}, "
                f"the request says {request.disk_format}",
                type="InvalidRequest",
                non_retryable=True,
            )
        # Digests the operator gave win over the record's; both are checked when both exist.
        return record.model_copy(
            update={"sha256": request.sha256 or record.sha256, "sha512": request.sha512 or record.sha512}
        )

    async def _step(
        self,
        phase: Phase,
        activity: Callable[[Any, Any], Awaitable[T]],
        argument: Any,
        options: StepOptions,
    ) -> T:
        if self._abort_reason is not None and phase in ABORTABLE:
            raise _Aborted()
        self._enter(phase)
        began = workflow.now()
        # Wait for a cancelled activity to really stop: an undo must never race the step it undoes.
        self._current = workflow.start_activity_method(
            activity,
            argument,
            task_queue=self._queue,
            start_to_close_timeout=options.start_to_close,
            heartbeat_timeout=options.heartbeat,
            retry_policy=options.retry_policy(),
            cancellation_type=ActivityCancellationType.WAIT_CANCELLATION_COMPLETED,
            summary=f"{phase.value}: {self._request.instance}",
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
        if self._abort_reason is not None and phase in ABORTABLE:
            # The abort came while the step finished anyway: it still wins.
            raise _Aborted()
        return result

    def _end_step(self, phase: Phase, began: datetime) -> None:
        self._current = None
        elapsed = (workflow.now() - began).total_seconds()
        self._step_seconds[phase.value] = self._step_seconds.get(phase.value, 0.0) + elapsed
        # Seconds, named so: the exporter's unit suffix would make "s" a "_s".
        workflow.metric_meter().create_histogram_float(
            "rebuild_step_seconds", "Duration of each rebuild step in seconds"
        ).record(elapsed, {"step": phase.value})

    def _push(self, name: str, action: Callable[[], Awaitable[Any]]) -> None:
        """Register an undo before the step it undoes acts: a crash mid-step still gets undone."""
        self._undo.append(_Undo(name, action))

    def _enter(self, phase: Phase) -> None:
        self._phase = phase
        workflow.logger.info("%s on %s: phase %s", self._request.instance, self._request.host, phase.value)
        workflow.upsert_search_attributes([sa.REBUILD_PHASE.value_set(phase.value)])
        workflow.set_current_details(self._details())

    def _verify_label(self) -> str:
        if self._request.verify is not None:
            return self._request.verify
        if self._request.boot_marker is not None:
            return f"marker:{self._request.boot_marker}"
        return "default (agent if the domain has its channel, else running)"

    def _details(self) -> str:
        lines = [
            f"**{self._request.instance}** on `{self._request.host}`: phase **{self._phase.value}**",
            f"image: {self._request.image_label}",
        ]
        if self._step_seconds:
            timings = ", ".join(f"{k} {v:.2f}s" for k, v in self._step_seconds.items())
            lines.append(f"steps: {timings}")
        if self._identity:
            lines.append(f"identity: {self._identity}")
        stop = f"stopped by {self._stopped_by}" if self._stopped_by else "stop: ACPI, agent, then forced"
        verify = (
            f"verified by {self._verified_by}" if self._verified_by else f"verify: {self._verify_label()}"
        )
        lines.append(f"{stop}; {verify}")
        if self._last_error:
            lines.append(f"error: {self._last_error}")
        return "\n\n".join(lines)

    async def _fail(self, err: BaseException) -> None:
        """Run the undos in reverse, then fail with what failed and what state the instance is in."""
        failed_step = self._phase
        if self._abort_reason is not None:
            self._last_error, self._last_error_type = f"aborted: {self._abort_reason}", "Aborted"
        elif isinstance(err, _Reverted):
            self._last_error, self._last_error_type = f"reverted: {err}", "Reverted"
        else:
            self._last_error, self._last_error_type = describe(err)
        if not self._undo:
            _count("rebuilds_failed_unchanged")
            self._enter(Phase.FAILED)
            raise ApplicationError(
                f"rebuild of {self._request.instance} failed at {failed_step.value}: "
                f"{self._last_error}; nothing was changed",
                self._result(Outcome.UNCHANGED, failed_step),
                type="RebuildFailed",
                non_retryable=True,
            ) from None
        self._enter(Phase.ROLLBACK)
        while self._undo:
            undo = self._undo.pop()
            began = workflow.now()
            try:
                await undo.action()
            except ActivityError as undo_err:
                # Only a non-retryable error gets here (undos retry without limit): stop, because
                # the next undo may assume this one worked; a person has to look.
                reason, _ = describe(undo_err)
                self._last_error = f"{self._last_error}; rollback step '{undo.name}' failed: {reason}"
                _count("rebuilds_rollback_failed")
                self._enter(Phase.FAILED)
                raise ApplicationError(
                    f"rebuild of {self._request.instance} failed at {failed_step.value} and its "
                    f"rollback failed at '{undo.name}': {reason}; the old root disk is kept as a "
                    "backup next to the disk; manual attention needed",
                    self._result(Outcome.ROLLBACK_FAILED, failed_step),
                    type="RollbackFailed",
                    non_retryable=True,
                ) from None
            self._undone.append(undo.name)
            elapsed = (workflow.now() - began).total_seconds()
            key = Phase.ROLLBACK.value
            self._step_seconds[key] = self._step_seconds.get(key, 0.0) + elapsed
        self._enter(Phase.ROLLED_BACK)
        _count("rebuilds_rolled_back")
        raise ApplicationError(
            f"rebuild of {self._request.instance} failed at {failed_step.value}: "
            f"{self._last_error}; the instance was rolled back to its old root disk",
            self._result(Outcome.ROLLED_BACK, failed_step),
            type="RebuildRolledBack",
            non_retryable=True,
        ) from None

    def _result(self, outcome: Outcome, failed_step: Phase) -> RebuildResult:
        return RebuildResult(
            instance=self._request.instance,
            host=self._request.host,
            outcome=outcome,
            image_sha256=self._image_sha256,
            failed_step=failed_step,
            error=self._last_error,
            error_type=self._last_error_type,
            step_seconds=dict(self._step_seconds),
            undone=list(self._undone),
            stopped_by=self._stopped_by,
            verified_by=self._verified_by,
        )

    async def _undo_activity(self, activity: Callable[[Any, Any], Awaitable[Any]], arg: Any) -> None:
        await workflow.execute_activity_method(
            activity,
            arg,
            task_queue=self._queue,
            start_to_close_timeout=UNDO.start_to_close,
            heartbeat_timeout=UNDO.heartbeat,
            retry_policy=UNDO.retry_policy(),
            summary=f"rollback: {self._request.instance}",
        )

    async def _undo_stop(self) -> None:
        await self._undo_activity(
            HypervisorActivities.start_instance, StartInstanceInput(instance=self._request.instance)
        )

    async def _undo_prepare(self, restore: RestoreRootDiskInput) -> None:
        await self._undo_activity(DiskActivities.restore_root_disk, restore)

    async def _undo_start(self) -> None:
        # Forced off at once: the new disk is about to be replaced, nothing on it is worth a wait.
        await self._undo_activity(
            HypervisorActivities.stop_instance,
            StopInstanceInput(instance=self._request.instance, timeout_seconds=0),
        )


def _rebuild_id() -> str:
    """Names the backup of this rebuild. It must outlive ``temporal workflow reset``, which starts a
    new run (a new run ID) that continues from a point after prepare: the first run's ID survives it.
    Rebuilds started before this patch keep the run ID they named their backup by."""
    info = workflow.info()
    if workflow.patched(PATCH_REBUILD_ID):
        return info.first_execution_run_id
    return info.run_id


def _count(name: str) -> None:
    """The project's own counters, next to the SDK's (replay-safe: the meter skips replays)."""
    workflow.metric_meter().create_counter(name, f"Rebuilds: {name.removeprefix('rebuilds_')}").add(1)


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
