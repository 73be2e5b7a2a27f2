"""Fake host activities for workflow tests: the same names as the real ones, recording every call.

Temporal's own docs test workflows this way; each real activity is tested against real things in its
own module.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager, suppress
from datetime import UTC, datetime, timedelta
from typing import Any

from temporalio import activity
from temporalio.client import Client
from temporalio.exceptions import ApplicationError
from temporalio.worker import Worker

from workflows import snapshot_models as sn
from workflows.models import (
    CachedImage,
    CheckedImage,
    CheckImageInput,
    CleanUpInput,
    DiscardStagedRootDiskInput,
    FetchImageInput,
    InspectInstanceInput,
    InstanceInfo,
    PlannedRootDisk,
    PlanRootDiskInput,
    PreflightInput,
    PreflightResult,
    PreparedRootDisk,
    PrepareRootDiskInput,
    RebuildRequest,
    RecordImageInput,
    RemoveBackupInput,
    ResolvedImage,
    ResolveGlanceImageInput,
    RestoreRootDiskInput,
    StagedRootDisk,
    StageRootDiskInput,
    StartInstanceInput,
    StartResult,
    StopInstanceInput,
    StopResult,
    SwapRootDiskInput,
    SwapRootDiskResult,
    VerifyInstanceInput,
    VerifyResult,
    host_task_queue,
)
from workflows.rebuild import RebuildInstance
from workflows.snapshot import SnapshotInstance

SHA = "ab" * 32
T0 = datetime(2026, 1, 1, tzinfo=UTC)


class FakeHost:
    """One instance on one fake host. ``fail_at`` names an activity that fails non-retryably."""

    def __init__(
        self,
        fail_at: str | None = None,
        was_running: bool = True,
        error_type: str = "InjectedFailure",
    ) -> None:
        self.fail_at = fail_at
        self.was_running = was_running
        self.error_type = error_type
        # Activity name -> how many of its first attempts fail with a retryable error.
        self.flaky: dict[str, int] = {}
        self.calls: list[str] = []
        self.gates: dict[str, asyncio.Event] = {}
        self.reached: dict[str, asyncio.Event] = {}
        self.held: dict[str, asyncio.Event] = {}
        # The host worker's --disk-mode, and the modes stage was asked for (None: the worker's).
        self.disk_mode = "overlay"
        self.staged_modes: list[str | None] = []
        self.snapshots: dict[str, sn.SnapshotRecord] = {}
        # Whether inspect says this host has swap_root_disk (the real worker does); which part of it a
        # fail_at="swap_root_disk" names as the one that failed.
        self.swaps_in_one_step = False
        self.swap_fails_in = "start"
        # Whether inspect says this host has clean_up_rebuild (remove_backup and record_image in one).
        self.cleans_up_in_one_step = False

    def hold(self, name: str) -> None:
        """Make activity ``name`` wait until :meth:`release` (the first time it runs)."""
        self.gates[name] = asyncio.Event()
        self.reached[name] = asyncio.Event()

    def release(self, name: str) -> None:
        self.held[name].set()

    async def _enter(self, name: str) -> None:
        self.calls.append(name)
        if name in self.gates:
            # Only the first run waits: an undo calling the same activity must get through.
            gate = self.held[name] = self.gates.pop(name)
            self.reached[name].set()
            while not gate.is_set():
                activity.heartbeat()
                with suppress(TimeoutError):
                    await asyncio.wait_for(gate.wait(), 0.2)
        if self.fail_at == name and self.calls.count(name) == 1:
            raise ApplicationError(f"{name} failed on purpose", type=self.error_type, non_retryable=True)
        if self.calls.count(name) <= self.flaky.get(name, 0):
            raise ApplicationError(f"{name} failed for a while", type="HypervisorUnavailable")

    def activities(self) -> list[Callable[..., Any]]:
        @activity.defn(name="inspect_instance")
        async def inspect_instance(request: InspectInstanceInput) -> InstanceInfo:
            await self._enter("inspect_instance")
            return InstanceInfo(
                name=request.instance,
                uuid=str(uuid.UUID(int=1)),
                was_running=self.was_running,
                root_disk_path="/fake/disk.img",
                root_disk_format="raw",
                root_disk_target="vda",
                swaps_in_one_step=self.swaps_in_one_step,
                cleans_up_in_one_step=self.cleans_up_in_one_step,
            )

        @activity.defn(name="resolve_glance_image")
        async def resolve_glance_image(request: ResolveGlanceImageInput) -> ResolvedImage:
            await self._enter("resolve_glance_image")
            return ResolvedImage(
                url=f"{request.glance_url}/v2/images/{request.image_id}/file", sha256=SHA, disk_format="qcow2"
            )

        @activity.defn(name="fetch_image")
        async def fetch_image(request: FetchImageInput) -> CachedImage:
            await self._enter("fetch_image")
            return CachedImage(sha256=request.sha256 or SHA, size=1, downloaded_bytes=1, cache_hit=False)

        @activity.defn(name="check_image")
        async def check_image(request: CheckImageInput) -> CheckedImage:
            await self._enter("check_image")
            return CheckedImage(sha256=request.sha256, format="qcow2", virtual_size=1 << 20)

        @activity.defn(name="stop_instance")
        async def stop_instance(request: StopInstanceInput) -> StopResult:
            await self._enter("stop_instance")
            return StopResult(
                was_running=True, forced=False, stopped_at=T0, console_offset=7, stopped_by="acpi"
            )

        @activity.defn(name="stage_root_disk")
        async def stage_root_disk(request: StageRootDiskInput) -> StagedRootDisk:
            await self._enter("stage_root_disk")
            self.staged_modes.append(request.disk_mode)
            mode = request.disk_mode or self.disk_mode
            return StagedRootDisk(staged_at="/fake/disk.img.new", virtual_size=1, mode=mode)

        @activity.defn(name="preflight_image")
        async def preflight_image(request: PreflightInput) -> PreflightResult:
            await self._enter("preflight_image")
            return PreflightResult(verified_by=request.verify or "running:5", detail="sandbox booted")

        @activity.defn(name="plan_root_disk")
        async def plan_root_disk(request: PlanRootDiskInput) -> PlannedRootDisk:
            await self._enter("plan_root_disk")
            return PlannedRootDisk(
                target="vda",
                path="/fake/disk.img",
                kind="file",
                format="raw",
                virtual_size=1,
                new_virtual_size=1,
                mode=request.disk_mode or self.disk_mode,
            )

        @activity.defn(name="discard_staged_root_disk")
        async def discard_staged_root_disk(request: DiscardStagedRootDiskInput) -> None:
            await self._enter("discard_staged_root_disk")

        @activity.defn(name="prepare_root_disk")
        async def prepare_root_disk(request: PrepareRootDiskInput) -> PreparedRootDisk:
            await self._enter("prepare_root_disk")
            return PreparedRootDisk(
                disk_path="/fake/disk.img", backup_path="/fake/disk.img.backup", virtual_size=1
            )

        @activity.defn(name="start_instance")
        async def start_instance(request: StartInstanceInput) -> StartResult:
            await self._enter("start_instance")
            return StartResult(started_at=T0 + timedelta(seconds=0.5))

        @activity.defn(name="swap_root_disk")
        async def swap_root_disk(request: SwapRootDiskInput) -> SwapRootDiskResult:
            try:
                await self._enter("swap_root_disk")
            except ApplicationError as err:
                step = {"step": self.swap_fails_in}
                raise ApplicationError(
                    err.message, step, type=err.type, non_retryable=err.non_retryable
                ) from None
            return SwapRootDiskResult(
                stopped=StopResult(was_running=True, forced=True, stopped_at=T0, stopped_by="forced"),
                prepared=PreparedRootDisk(
                    disk_path="/fake/disk.img", backup_path="/fake/disk.img.backup", virtual_size=1
                ),
                started=StartResult(started_at=T0 + timedelta(seconds=0.25)),
                prepare_seconds=0.0,
                start_seconds=0.0,
            )

        @activity.defn(name="verify_instance")
        async def verify_instance(request: VerifyInstanceInput) -> VerifyResult:
            await self._enter("verify_instance")
            return VerifyResult(verified_by=request.verify or "running:5")

        @activity.defn(name="restore_root_disk")
        async def restore_root_disk(request: RestoreRootDiskInput) -> None:
            await self._enter("restore_root_disk")

        @activity.defn(name="remove_backup")
        async def remove_backup(request: RemoveBackupInput) -> None:
            await self._enter("remove_backup")

        @activity.defn(name="record_image")
        async def record_image(request: RecordImageInput) -> None:
            await self._enter("record_image")

        @activity.defn(name="clean_up_rebuild")
        async def clean_up_rebuild(request: CleanUpInput) -> None:
            await self._enter("clean_up_rebuild")

        return [
            *self._snapshot_activities(),
            inspect_instance,
            resolve_glance_image,
            fetch_image,
            check_image,
            stop_instance,
            preflight_image,
            stage_root_disk,
            plan_root_disk,
            discard_staged_root_disk,
            prepare_root_disk,
            start_instance,
            swap_root_disk,
            verify_instance,
            restore_root_disk,
            remove_backup,
            record_image,
            clean_up_rebuild,
        ]

    def _snapshot_activities(self) -> list[Callable[..., Any]]:
        @activity.defn(name="take_snapshot")
        async def take_snapshot(request: sn.TakeSnapshotInput) -> sn.SnapshotRecord:
            await self._enter("take_snapshot")
            taken = self.snapshots[request.snapshot_id] = snapshot_record(
                request.snapshot_id, request.instance
            )
            return taken

        @activity.defn(name="discard_snapshot")
        async def discard_snapshot(request: sn.DiscardSnapshotInput) -> None:
            await self._enter("discard_snapshot")

        @activity.defn(name="prune_snapshots")
        async def prune_snapshots(request: sn.PruneSnapshotsInput) -> sn.SnapshotCatalogResult:
            await self._enter("prune_snapshots")
            return sn.SnapshotCatalogResult(deleted=("0" * 32,))

        @activity.defn(name="resolve_snapshot")
        async def resolve_snapshot(request: sn.ResolveSnapshotInput) -> sn.SnapshotImage:
            await self._enter("resolve_snapshot")
            return sn.SnapshotImage(
                record=snapshot_record(request.snapshot_id, "vm"),
                source=ResolvedImage(url=f"snapshot:{request.snapshot_id}", sha256=SHA, disk_format="qcow2"),
                cached=CachedImage(sha256=SHA, size=1, downloaded_bytes=0, cache_hit=True),
            )

        @activity.defn(name="snapshot_catalog")
        async def snapshot_catalog(request: sn.SnapshotCatalogRequest) -> sn.SnapshotCatalogResult:
            await self._enter("snapshot_catalog")
            if request.action == "list":
                return sn.SnapshotCatalogResult(snapshots=tuple(self.snapshots.values()))
            if missing := [i for i in request.snapshot_ids if i not in self.snapshots]:
                raise ApplicationError(
                    f"no snapshot {missing[0]}", type="SnapshotNotFound", non_retryable=True
                )
            for snapshot_id in request.snapshot_ids:
                del self.snapshots[snapshot_id]
            return sn.SnapshotCatalogResult(deleted=request.snapshot_ids)

        return [take_snapshot, discard_snapshot, prune_snapshots, resolve_snapshot, snapshot_catalog]


def snapshot_record(snapshot_id: str, instance: str) -> sn.SnapshotRecord:
    return sn.SnapshotRecord(
        snapshot_id=snapshot_id,
        instance=instance,
        instance_uuid=str(uuid.UUID(int=1)),
        host="fake",
        taken_at=T0,
        sha256=SHA,
        format="qcow2",
        size=1,
        virtual_size=1 << 20,
        consistency="crash-consistent",
        root_disk_target="vda",
    )


@asynccontextmanager
async def running_workers(
    client: Client, host: str, fake: FakeHost, real: Sequence[Callable[..., Any]] = ()
) -> AsyncIterator[str]:
    """Workers on a unique workflow queue and the host's queue; yields the workflow queue.

    ``real`` activities replace the fakes of the same name (real disk work on real files, say).
    """
    workflow_queue = f"wf-{host}"
    chosen = {fn.__name__: fn for fn in fake.activities()} | {fn.__name__: fn for fn in real}
    async with (
        Worker(client, task_queue=workflow_queue, workflows=[RebuildInstance, SnapshotInstance]),
        Worker(
            client,
            task_queue=host_task_queue(host),
            activities=list(chosen.values()),
            # Cancellation reaches an activity with its next heartbeat: don't make tests wait 8 s.
            max_heartbeat_throttle_interval=timedelta(milliseconds=200),
        ),
    ):
        yield workflow_queue


def request_for(host: str, **overrides: Any) -> RebuildRequest:
    fields: dict[str, Any] = {
        "instance": "vm-1",
        "host": host,
        "image_url": "http://images.invalid/new.qcow2",
        "sha256": SHA,
    }
    fields.update(overrides)
    return RebuildRequest(**fields)
