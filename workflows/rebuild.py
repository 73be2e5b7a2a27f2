"""The RebuildInstance workflow: the rebuild's story, one step after another. Start reading here.

Order (see ``run``): inspect -> resolve (a Glance image only) -> fetch -> check -> preflight (when
asked) -> await-approval (when asked) -> stage (the new disk, written beside the old one), all while the
instance still runs and nothing on it has changed; then stop -> prepare (the swap) -> seed (when the
guest gets an identity) -> start -> verify -> confirm-window (when asked) -> cleanup. Unlike Nova, the
download and the new disk come before the stop: the instance is down only for the swap. Every step
that changes the host pushes its undo before it acts (the undo table is in docs/how-it-works.md); a
step that fails for good, an abort, a revert or a cancellation runs the undos in reverse.

The machinery lives beside it: ``steps.py`` (each step's timeouts and retries, the step runner),
``saga.py`` (the undo stack and the three endings), ``rebuild_view.py`` (status, result, Web UI text),
``image_steps.py`` (resolve, fetch, check, shared with the fleet's prefetch), ``contract.py`` (the host
activities, typed), ``names.py`` (the names clients and histories know).
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

from temporalio import workflow
from temporalio.exceptions import ActivityError, ApplicationError, CancelledError

with workflow.unsafe.imports_passed_through():
    from workflows import activity_models as io
    from workflows import contract, dry_run, image_steps, metrics
    from workflows import search_attributes as sa
    from workflows.image_steps import In, NewImage, Out
    from workflows.models import (
        AbortAnswer,
        AbortRequest,
        Decision,
        Outcome,
        Phase,
        RebuildRequest,
        RebuildResult,
        RebuildStatus,
    )
    from workflows.names import (
        ABORT_SIGNAL,
        ABORT_UPDATE,
        APPROVE_SIGNAL,
        CONFIRM_SIGNAL,
        PATCH_CLEAN_UP_IN_ONE_STEP,
        PATCH_CLEANUP_NEVER_FAILS,
        PATCH_CURRENT_IMAGE,
        PATCH_IMAGE_ID_AFTER_FETCH,
        PATCH_REBUILD_ID,
        PATCH_STAGE_BEFORE_STOP,
        PATCH_SWAP_IN_ONE_STEP,
        REVERT_SIGNAL,
        STATUS_QUERY,
        WORKFLOW_NAME,
        host_task_queue,
    )
    from workflows.rebuild_view import RebuildState, describe
    from workflows.saga import Reverted, Saga
    from workflows.steps import (
        ABORTABLE,
        APPROVABLE,
        CLEANUP,
        IMAGE_STEPS,
        INSPECT,
        PLAN,
        PREPARE,
        SEED,
        STAGE,
        START,
        Aborted,
        StepRunner,
        preflight_options,
        stop_options,
        swap_options,
        verify_options,
    )


@workflow.defn(name=WORKFLOW_NAME)
class RebuildInstance:
    @workflow.init
    def __init__(self, request: RebuildRequest) -> None:
        self._request = request
        self._state = RebuildState(request)
        self._steps = StepRunner(self._state, host_task_queue(request.host))
        self._saga = Saga(self._state, self._steps)
        self._approved_by: str | None = None
        self._decision: tuple[str, str] | None = None
        self._rebuild_id: str | None = None
        self._forced = False

    @workflow.query(name=STATUS_QUERY)
    def status(self) -> RebuildStatus:
        status = self._state.status(self._saga.names(), workflow.info().start_time)
        # A query's answer is not in the history: adding to it needs no patch.
        return status.model_copy(update={"approved_by": self._approved_by})

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
            self._state.ignore("approve", "this rebuild does not wait for approval")
        elif self._state.phase not in APPROVABLE:
            self._state.ignore("approve", "the rebuild is past its approval")
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
        if self._state.phase != Phase.CONFIRM_WINDOW:
            self._state.ignore(verdict, "only meaningful in the confirm window")
        elif self._decision is not None:
            self._state.ignore(verdict, f"already decided: {self._decision[0]}")
        else:
            self._decision = (verdict, f"{decision.reason or verdict} (by {decision.requested_by})")

    def _try_abort(self, request: AbortRequest) -> AbortAnswer:
        state = self._state
        if state.abort_reason is not None:
            message = f"already aborting: {state.abort_reason}"
        elif state.phase not in ABORTABLE:
            over = "the new disk is in place and verified" if state.phase == Phase.CLEANUP else "it is over"
            message = f"too late to abort in phase {state.phase.value}: {over}"
        else:
            state.abort_reason = f"{request.reason} (by {request.requested_by})"
            self._steps.cancel_current()
            return AbortAnswer(accepted=True, phase=state.phase, message="abort accepted")
        state.ignore("abort", message)
        return AbortAnswer(accepted=False, phase=state.phase, message=message)

    @workflow.run
    async def run(self, request: RebuildRequest) -> RebuildResult:
        """The rebuild's steps; any failure, abort or cancellation before cleanup runs the undos."""
        self._rebuild_id = self._state.rebuild_id = _rebuild_id()
        # A dry run is no rebuild: it is counted nowhere (only requests that ask for one skip this).
        if not request.dry_run:
            metrics.rebuild_started(request.host)
        try:
            instance = await self._inspect(request)
            request = self._current_image(request, instance)
            image = await self._fetch_and_check(request)
            booted = await self._preflight(request, instance, image)
            if request.dry_run:
                return await self._plan(request, instance, image, booted)
            if request.require_approval:
                await self._await_approval(request)
            await self._stage(instance, image)
            downtime: float | None
            if self._swaps_in_one_step(request, instance):
                seeded = False
                downtime = await self._swap_in_one_step(request, instance, image)
            else:
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
            Aborted,
            Reverted,
        ) as err:
            await self._saga.fail(err)
        # The new disk is in place and verified: from here on nothing is undone.
        self._saga.clear()
        await self._clean_up(instance, image, seeded)
        self._state.outcome, self._state.downtime_seconds = Outcome.REBUILT, downtime
        self._steps.enter(Phase.DONE)
        metrics.rebuild_finished(request.host, Outcome.REBUILT, _seconds_since_start(), downtime)
        return self._state.rebuilt(image, downtime, self._forced)

    async def _inspect(self, request: RebuildRequest) -> io.InstanceInfo:
        return await self._steps.run(
            Phase.INSPECT,
            contract.inspect_instance,
            io.InspectInstanceInput(
                instance=request.instance,
                root_disk=request.root_disk,
                discard_snapshots=request.discard_snapshots,
            ),
            INSPECT,
        )

    def _current_image(self, request: RebuildRequest, instance: io.InstanceInfo) -> RebuildRequest:
        """A request naming no image rebuilds the instance from the image it records ("reinstall"),
        with the recorded digest; one that records none is refused, nothing changed.

        Asked only for requests that name no image, which no history from before it holds (the edges
        refused them), so other rebuilds record no marker.
        """
        if not request.names_no_image or not workflow.patched(PATCH_CURRENT_IMAGE):
            return request
        url, sha256 = instance.current_image_url, instance.current_image_sha256
        if url is None or sha256 is None:
            raise ApplicationError(
                f"instance {request.instance!r} records no image in its <metadata> (no rebuild here has "
                "recorded one yet): name the image to rebuild it from",
                type="InvalidRequest",
                non_retryable=True,
            )
        if url.startswith("snapshot:"):
            current = request.model_copy(update={"snapshot_id": url.removeprefix("snapshot:")})
        else:
            current = request.model_copy(update={"image_url": url, "sha256": sha256})
        self._request = self._state.request = current
        return current

    async def _fetch_and_check(self, request: RebuildRequest) -> NewImage:
        """Download and check the image while the instance still runs: nothing changes on it yet."""
        return await image_steps.fetch_and_check(request, self._image_step, after_fetch=self._fetched)

    async def _image_step(self, phase: Phase, activity: contract.HostActivity[In, Out], argument: In) -> Out:
        return await self._steps.run(phase, activity, argument, IMAGE_STEPS[phase])

    def _fetched(self, cached: io.CachedImage) -> None:
        self._state.image_sha256 = cached.sha256
        if workflow.patched(PATCH_IMAGE_ID_AFTER_FETCH):
            workflow.upsert_search_attributes([sa.IMAGE_ID.value_set(cached.sha256)])

    async def _preflight(
        self, request: RebuildRequest, instance: io.InstanceInfo, image: NewImage
    ) -> io.PreflightResult | None:
        """Boot the new image in a sandbox while the instance still runs: a broken one costs no downtime.

        Only rebuilds that ask for it (or whose host worker does by default) have this step: histories
        from before it replay unchanged.
        """
        wanted = instance.preflight_by_default if request.preflight is None else request.preflight
        if not wanted:
            return None
        assert self._rebuild_id is not None
        return await self._steps.run(
            Phase.PREFLIGHT,
            contract.preflight_image,
            io.PreflightInput(
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
            preflight_options(request.boot_timeout_seconds),
        )

    async def _plan(
        self,
        request: RebuildRequest,
        instance: io.InstanceInfo,
        image: NewImage,
        booted: io.PreflightResult | None,
    ) -> RebuildResult:
        """A dry run ends here, before anything changes: the back end says how it would make the new
        disk (and refuses what stage would), and the plan says what the real run would change.

        Only dry runs, which no history from before them holds, get here: no patch marker.
        """
        disk = await self._steps.run(
            Phase.PLAN,
            contract.plan_root_disk,
            io.PlanRootDiskInput(
                **self._new_disk(instance, image),
                disk_mode=request.disk_mode,
                discard_snapshots=request.discard_snapshots,
            ),
            PLAN,
        )
        plan = dry_run.rebuild_plan(request, instance, image, disk, booted)
        self._state.plan, self._state.disk_mode = plan, disk.mode
        self._state.outcome = Outcome.PLANNED
        self._steps.enter(Phase.PLANNED)
        return self._state.planned(image, plan)

    async def _stage(self, instance: io.InstanceInfo, image: NewImage) -> None:
        """The new disk, written beside the old one while the instance still runs; its undo drops it.

        Rebuilds started before this step made their new disk in prepare, inside the downtime.
        """
        if not workflow.patched(PATCH_STAGE_BEFORE_STOP):
            return
        assert self._rebuild_id is not None
        discard = io.DiscardStagedRootDiskInput(
            instance=self._request.instance,
            rebuild_id=self._rebuild_id,
            root_disk_target=instance.root_disk_target,
        )
        drop = lambda: self._steps.undo(contract.discard_staged_root_disk, discard)  # noqa: E731
        self._saga.push("drop the staged disk", drop, tidy=True)
        staged = await self._steps.run(
            Phase.STAGE,
            contract.stage_root_disk,
            io.StageRootDiskInput(**self._new_disk(instance, image), disk_mode=self._request.disk_mode),
            STAGE,
        )
        self._state.disk_mode = staged.mode

    async def _stop(self, request: RebuildRequest, instance: io.InstanceInfo) -> io.StopResult:
        if instance.was_running:
            self._saga.push("start instance again", self._undo_stop)
            # For followers only (the status query): the graceful shutdown's window as the worker keeps it.
            seconds = request.stop_timeout_seconds
            self._state.graceful_stop_deadline = workflow.now() + timedelta(seconds=seconds)
        stopped = await self._steps.run(
            Phase.STOP,
            contract.stop_instance,
            io.StopInstanceInput(instance=request.instance, timeout_seconds=request.stop_timeout_seconds),
            stop_options(request.stop_timeout_seconds),
        )
        self._state.stopped_by = stopped.stopped_by
        self._forced = stopped.forced
        return stopped

    def _swaps_in_one_step(self, request: RebuildRequest, instance: io.InstanceInfo) -> bool:
        """Stop, prepare and start as one activity: where the host's worker has it, the instance was
        running and starts again, and no seed goes between prepare and start. Histories from before
        (their inspect said nothing of it) keep their three steps."""
        should_start = instance.was_running if request.start_after is None else request.start_after
        seeds = request.identity is not None or instance.has_identity
        if not (instance.swaps_in_one_step and instance.was_running and should_start and not seeds):
            return False
        return workflow.patched(PATCH_SWAP_IN_ONE_STEP)

    async def _swap_in_one_step(
        self, request: RebuildRequest, instance: io.InstanceInfo, image: NewImage
    ) -> float:
        """The downtime as one step (``swap_root_disk``): every undo of the three is pushed first, in
        their order, so a failure anywhere in it rolls back as the three steps would."""
        assert self._rebuild_id is not None
        restore = io.RestoreRootDiskInput(
            instance=request.instance,
            rebuild_id=self._rebuild_id,
            original_format=instance.root_disk_format,
            image_sha256=image.checked.sha256,
            root_disk_target=instance.root_disk_target,
        )
        self._saga.push("start instance again", self._undo_stop)
        self._saga.push("restore old root disk", lambda: self._undo_prepare(restore))
        self._saga.push("stop instance on new disk", self._undo_start)
        swap = io.SwapRootDiskInput(
            stop=io.StopInstanceInput(
                instance=request.instance, timeout_seconds=request.stop_timeout_seconds
            ),
            prepare=io.PrepareRootDiskInput(
                **self._new_disk(instance, image),
                original_format=instance.root_disk_format,
                discard_snapshots=request.discard_snapshots,
            ),
            start=io.StartInstanceInput(instance=request.instance, rebuild_id=self._rebuild_id),
        )
        # For followers only (the status query), as in the three-step stop.
        seconds = request.stop_timeout_seconds
        self._state.graceful_stop_deadline = workflow.now() + timedelta(seconds=seconds)
        try:
            swapped = await self._steps.run(
                Phase.STOP, contract.swap_root_disk, swap, swap_options(request.stop_timeout_seconds)
            )
        except ActivityError as err:
            # The rebuild says which of the three failed.
            step = _failed_step(err)
            if step is not None:
                self._state.phase = step
            raise
        state = self._state
        state.stopped_by = swapped.stopped.stopped_by
        self._forced = swapped.stopped.forced
        # The one step's time, told as the three steps' it holds.
        parts = swapped.prepare_seconds + swapped.start_seconds
        state.add_seconds(Phase.STOP.value, -min(parts, state.step_seconds.get(Phase.STOP.value, 0.0)))
        state.add_seconds(Phase.PREPARE.value, swapped.prepare_seconds)
        state.add_seconds(Phase.START.value, swapped.start_seconds)
        # The step histogram's stop holds the whole activity; prepare and start as the host timed them.
        metrics.step_finished(request.host, Phase.PREPARE.value, swapped.prepare_seconds)
        metrics.step_finished(request.host, Phase.START.value, swapped.start_seconds)
        await self._verify(request, instance, swapped.stopped, image)
        return (swapped.started.started_at - swapped.stopped.stopped_at).total_seconds()

    async def _prepare(self, instance: io.InstanceInfo, image: NewImage) -> None:
        """The old disk becomes the backup, named by the rebuild ID: the undo finds it even after a reset."""
        assert self._rebuild_id is not None
        restore = io.RestoreRootDiskInput(
            instance=self._request.instance,
            rebuild_id=self._rebuild_id,
            original_format=instance.root_disk_format,
            image_sha256=image.checked.sha256,
            root_disk_target=instance.root_disk_target,
        )
        self._saga.push("restore old root disk", lambda: self._undo_prepare(restore))
        await self._steps.run(
            Phase.PREPARE,
            contract.prepare_root_disk,
            io.PrepareRootDiskInput(
                **self._new_disk(instance, image),
                original_format=instance.root_disk_format,
                discard_snapshots=self._request.discard_snapshots,
            ),
            PREPARE,
        )

    def _new_disk(self, instance: io.InstanceInfo, image: NewImage) -> dict[str, Any]:
        """What stage and prepare make the new disk from (``NewRootDisk``'s fields)."""
        assert self._rebuild_id is not None
        return {
            "instance": self._request.instance,
            "rebuild_id": self._rebuild_id,
            "root_disk_target": instance.root_disk_target,
            "image_sha256": image.checked.sha256,
            "image_format": image.checked.format,
            "image_virtual_size": image.checked.virtual_size,
            "min_virtual_size": image.source.min_disk_bytes,
            "max_virtual_size": self._request.max_virtual_size_bytes,
        }

    async def _seed(self, request: RebuildRequest, instance: io.InstanceInfo) -> bool:
        """A new cloud-init seed and identity while the instance is off; its undo puts the old back.

        Only rebuilds that give the guest an identity, or of instances that have one, have this step:
        histories from before it replay unchanged.
        """
        if request.identity is None and not instance.has_identity:
            return False
        assert self._rebuild_id is not None
        restore = io.RestoreSeedInput(
            instance=request.instance, rebuild_id=self._rebuild_id, root_disk_target=instance.root_disk_target
        )
        self._saga.push("restore old seed", lambda: self._steps.undo(contract.restore_seed, restore))
        seeded = await self._steps.run(
            Phase.SEED,
            contract.prepare_seed,
            io.PrepareSeedInput(
                instance=request.instance,
                rebuild_id=self._rebuild_id,
                change=request.identity,
                root_disk_target=instance.root_disk_target,
            ),
            SEED,
        )
        self._state.identity = seeded.summary
        return True

    async def _start_and_verify(
        self, request: RebuildRequest, instance: io.InstanceInfo, stopped: io.StopResult, image: NewImage
    ) -> float | None:
        """Boot the new disk where the instance should run; returns the downtime, if it was running."""
        should_start = instance.was_running if request.start_after is None else request.start_after
        if not should_start:
            return None
        self._saga.push("stop instance on new disk", self._undo_start)
        started = await self._steps.run(
            Phase.START,
            contract.start_instance,
            io.StartInstanceInput(instance=request.instance, rebuild_id=self._rebuild_id),
            START,
        )
        await self._verify(request, instance, stopped, image)
        if not instance.was_running:
            return None
        return (started.started_at - stopped.stopped_at).total_seconds()

    async def _verify(
        self, request: RebuildRequest, instance: io.InstanceInfo, stopped: io.StopResult, image: NewImage
    ) -> None:
        verified = await self._steps.run(
            Phase.VERIFY,
            contract.verify_instance,
            io.VerifyInstanceInput(
                instance=request.instance,
                boot_marker=request.boot_marker,
                boot_timeout_seconds=request.boot_timeout_seconds,
                console_offset=stopped.console_offset,
                verify=request.verify,
                root_disk_target=instance.root_disk_target,
                image_sha256=image.checked.sha256,
                rebuild_id=self._rebuild_id,
            ),
            verify_options(request.boot_timeout_seconds),
        )
        # None in histories from before verify reported how it verified.
        self._state.verified_by = verified.verified_by if verified is not None else None

    async def _clean_up(self, instance_info: io.InstanceInfo, image: NewImage, seeded: bool) -> None:
        """Drop the backup and record the new image. Retried without a limit; an error no retry can
        fix (the instance was undefined meanwhile) is reported with the result, not as a failure."""
        assert self._rebuild_id is not None
        instance = self._request.instance
        remove = io.RemoveBackupInput(
            instance=instance,
            rebuild_id=self._rebuild_id,
            root_disk_target=instance_info.root_disk_target,
            discard_snapshots=self._request.discard_snapshots,
        )

        def record() -> io.RecordImageInput:  # rebuilt_at: when the record is asked for
            return io.RecordImageInput(
                instance=instance,
                image_sha256=image.checked.sha256,
                image_url=image.source.url,
                rebuilt_at=workflow.now(),
            )

        try:
            if self._cleans_up_in_one_step(instance_info, seeded):
                await self._steps.run(
                    Phase.CLEANUP,
                    contract.clean_up_rebuild,
                    io.CleanUpInput(remove=remove, record=record()),
                    CLEANUP,
                )
                return
            await self._steps.run(Phase.CLEANUP, contract.remove_backup, remove, CLEANUP)
            if seeded:
                await self._steps.run(
                    Phase.CLEANUP,
                    contract.remove_seed_backup,
                    io.RemoveSeedBackupInput(
                        instance=instance,
                        rebuild_id=self._rebuild_id,
                        root_disk_target=instance_info.root_disk_target,
                    ),
                    CLEANUP,
                )
            await self._steps.run(Phase.CLEANUP, contract.record_image, record(), CLEANUP)
        except ActivityError as err:
            if not workflow.patched(PATCH_CLEANUP_NEVER_FAILS):
                raise
            self._state.cleanup_error, _ = describe(err)

    @staticmethod
    def _cleans_up_in_one_step(instance: io.InstanceInfo, seeded: bool) -> bool:
        """remove_backup and record_image as one activity where the host's worker has it and no seed
        backup goes between them. Histories from before (their inspect said nothing of it) keep two."""
        return instance.cleans_up_in_one_step and not seeded and workflow.patched(PATCH_CLEAN_UP_IN_ONE_STEP)

    async def _await_approval(self, request: RebuildRequest) -> None:
        """Nothing has changed yet; without an approval in time, nothing will."""
        seconds = request.approval_timeout_seconds
        self._state.approval_deadline = workflow.now() + timedelta(seconds=seconds)
        if not await self._steps.wait(Phase.AWAIT_APPROVAL, lambda: self._approved_by is not None, seconds):
            raise ApplicationError(
                f"no approval within {seconds:g} s", type="ApprovalTimeout", non_retryable=True
            )

    async def _confirm_window(self, seconds: float, revert_by_default: bool) -> None:
        """The new image runs; the old disk waits as a backup for `confirm`, `revert` or the end."""
        self._state.confirm_deadline = workflow.now() + timedelta(seconds=seconds)
        if not await self._steps.wait(Phase.CONFIRM_WINDOW, lambda: self._decision is not None, seconds):
            verdict = "revert" if revert_by_default else "confirm"
            self._decision = (verdict, f"{verdict} by default: the {seconds:g} s window ended")
        assert self._decision is not None
        if self._decision[0] == "revert":
            raise Reverted(self._decision[1])

    async def _undo_stop(self) -> None:
        await self._steps.undo(
            contract.start_instance, io.StartInstanceInput(instance=self._request.instance)
        )

    async def _undo_prepare(self, restore: io.RestoreRootDiskInput) -> None:
        await self._steps.undo(contract.restore_root_disk, restore)

    async def _undo_start(self) -> None:
        # Forced off at once: the new disk is about to be replaced, nothing on it is worth a wait.
        await self._steps.undo(
            contract.stop_instance,
            io.StopInstanceInput(instance=self._request.instance, timeout_seconds=0),
        )


def _seconds_since_start() -> float:
    return (workflow.now() - workflow.info().start_time).total_seconds()


def _failed_step(err: ActivityError) -> Phase | None:
    """Which part of ``swap_root_disk`` failed, from its error's details."""
    cause = err.cause
    if not isinstance(cause, ApplicationError) or not cause.details:
        return None
    named = cause.details[0]
    step = named.get("step") if isinstance(named, dict) else None
    return Phase(step) if step in (Phase.STOP, Phase.PREPARE, Phase.START) else None


def _rebuild_id() -> str:
    """Names the backup of this rebuild. It must outlive ``temporal workflow reset``, which starts a
    new run (a new run ID) that continues from a point after prepare: the first run's ID survives it.
    Rebuilds started before this patch keep the run ID they named their backup by."""
    info = workflow.info()
    if workflow.patched(PATCH_REBUILD_ID):
        return info.first_execution_run_id
    return info.run_id
