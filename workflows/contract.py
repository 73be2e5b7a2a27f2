"""The host activities as the workflows see them: typed stubs, named as the worker registers them.

A workflow needs an activity's name and its types, never its code: importing ``activities/`` would load
libvirt, aiohttp and qemu-img's wrappers into every workflow sandbox. Each stub carries the name, the
input model and the output model of one activity that ``worker.host_activities`` registers (histories
name activities by these method names), as samples-python's ``worker_specific_task_queues`` stubs its
activity; ``tests/test_layout.py`` checks that the two agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from temporalio import workflow

from workflows import activity_models as io
from workflows import snapshot_models as sn

In = TypeVar("In")
Out = TypeVar("Out")


@dataclass(frozen=True)
class HostActivity(Generic[In, Out]):
    """One host activity as a workflow calls it: the name the worker registers, what it takes and gives."""

    name: str
    takes: type[In]
    gives: type[Out]

    def start(self, argument: In, **options: Any) -> workflow.ActivityHandle[Out]:
        """Schedule it; the caller states the queue, the timeouts and the retry policy."""
        handle: workflow.ActivityHandle[Out] = workflow.start_activity(
            self.name, argument, result_type=self.gives, **options
        )
        return handle


Nothing = type(None)

# activities/hypervisor.py
inspect_instance = HostActivity("inspect_instance", io.InspectInstanceInput, io.InstanceInfo)
stop_instance = HostActivity("stop_instance", io.StopInstanceInput, io.StopResult)
start_instance = HostActivity("start_instance", io.StartInstanceInput, io.StartResult)
# None in histories from before verify reported how it verified.
verify_instance = HostActivity("verify_instance", io.VerifyInstanceInput, io.VerifyResult)
record_image = HostActivity("record_image", io.RecordImageInput, Nothing)
# activities/glance.py, images.py, preflight.py
resolve_glance_image = HostActivity("resolve_glance_image", io.ResolveGlanceImageInput, io.ResolvedImage)
fetch_image = HostActivity("fetch_image", io.FetchImageInput, io.CachedImage)
check_image = HostActivity("check_image", io.CheckImageInput, io.CheckedImage)
preflight_image = HostActivity("preflight_image", io.PreflightInput, io.PreflightResult)
# activities/disks.py
stage_root_disk = HostActivity("stage_root_disk", io.StageRootDiskInput, io.StagedRootDisk)
plan_root_disk = HostActivity("plan_root_disk", io.PlanRootDiskInput, io.PlannedRootDisk)
discard_staged_root_disk = HostActivity("discard_staged_root_disk", io.DiscardStagedRootDiskInput, Nothing)
prepare_root_disk = HostActivity("prepare_root_disk", io.PrepareRootDiskInput, io.PreparedRootDisk)
restore_root_disk = HostActivity("restore_root_disk", io.RestoreRootDiskInput, Nothing)
remove_backup = HostActivity("remove_backup", io.RemoveBackupInput, Nothing)
# activities/swap.py
swap_root_disk = HostActivity("swap_root_disk", io.SwapRootDiskInput, io.SwapRootDiskResult)
# activities/cleanup.py
clean_up_rebuild = HostActivity("clean_up_rebuild", io.CleanUpInput, Nothing)
# activities/seed.py
prepare_seed = HostActivity("prepare_seed", io.PrepareSeedInput, io.SeedResult)
restore_seed = HostActivity("restore_seed", io.RestoreSeedInput, Nothing)
remove_seed_backup = HostActivity("remove_seed_backup", io.RemoveSeedBackupInput, Nothing)
# activities/inventory.py
list_instances = HostActivity("list_instances", io.ListInstancesInput, io.HostInventory)

# activities/snapshots.py
take_snapshot = HostActivity("take_snapshot", sn.TakeSnapshotInput, sn.SnapshotRecord)
discard_snapshot = HostActivity("discard_snapshot", sn.DiscardSnapshotInput, Nothing)
resolve_snapshot = HostActivity("resolve_snapshot", sn.ResolveSnapshotInput, sn.SnapshotImage)
prune_snapshots = HostActivity("prune_snapshots", sn.PruneSnapshotsInput, sn.SnapshotCatalogResult)
snapshot_catalog = HostActivity("snapshot_catalog", sn.SnapshotCatalogRequest, sn.SnapshotCatalogResult)
# activities/glance_publish.py
publish_snapshot = HostActivity("publish_snapshot", sn.PublishSnapshotInput, sn.PublishedSnapshot)

# Every activity the workflows call.
STUBS: tuple[HostActivity[Any, Any], ...] = (
    inspect_instance, stop_instance, start_instance, verify_instance, record_image,
    resolve_glance_image, fetch_image, check_image, preflight_image,
    stage_root_disk, plan_root_disk, discard_staged_root_disk, prepare_root_disk, restore_root_disk,
    remove_backup, swap_root_disk, clean_up_rebuild,
    prepare_seed, restore_seed, remove_seed_backup,
    list_instances,
    take_snapshot, discard_snapshot, resolve_snapshot, prune_snapshots, snapshot_catalog, publish_snapshot,
)  # fmt: skip
