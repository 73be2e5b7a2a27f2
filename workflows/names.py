"""Every name the outside world and the histories know the two workflows by, in one place.

Clients (the CLI, the HTTP API, the fleet's children) call workflows, queries, signals and updates by
these names without importing the workflow modules; saved histories hold them, and the patch IDs, so
renaming any of them breaks running workflows. Plain constants and pure functions: no imports.
"""

from __future__ import annotations

__all__ = [
    "ABORT_FLEET_UPDATE",
    "ABORT_SIGNAL",
    "ABORT_UPDATE",
    "APPROVE_SIGNAL",
    "CONFIRM_SIGNAL",
    "FLEET_INSTANCES_QUERY",
    "FLEET_STATUS_QUERY",
    "FLEET_WORKFLOW",
    "PATCH_CLEANUP_NEVER_FAILS",
    "PATCH_CLEAN_UP_IN_ONE_STEP",
    "PATCH_CURRENT_IMAGE",
    "PATCH_IMAGE_ID_AFTER_FETCH",
    "PATCH_REBUILD_ID",
    "PATCH_STAGE_BEFORE_STOP",
    "PATCH_SWAP_IN_ONE_STEP",
    "PAUSE_UPDATE",
    "RESUME_UPDATE",
    "REVERT_SIGNAL",
    "SET_BATCH_SIZE_UPDATE",
    "STATUS_QUERY",
    "WORKFLOW_NAME",
    "WORKFLOW_TASK_QUEUE",
    "fleet_workflow_id",
    "host_task_queue",
    "legacy_rebuild_workflow_id",
    "rebuild_workflow_id",
]  # fmt: skip


# The shared queue every workflow runs on; host activities run on each host's own queue.
WORKFLOW_TASK_QUEUE = "rebuild"

# RebuildInstance and its handlers.
WORKFLOW_NAME = "RebuildInstance"
STATUS_QUERY = "status"
APPROVE_SIGNAL = "approve"
CONFIRM_SIGNAL = "confirm"
REVERT_SIGNAL = "revert"
ABORT_SIGNAL = "abort"
ABORT_UPDATE = "abort_rebuild"

# FleetRebuild and its handlers.
FLEET_WORKFLOW = "FleetRebuild"
FLEET_STATUS_QUERY = "status"
FLEET_INSTANCES_QUERY = "instances"
PAUSE_UPDATE = "pause"
RESUME_UPDATE = "resume"
SET_BATCH_SIZE_UPDATE = "set_batch_size"
ABORT_FLEET_UPDATE = "abort_fleet"

# Patch IDs: each guards a change of a workflow's commands, so workflows started on older code replay.
# The rebuild's search attribute ImageId is set once the image is fetched.
PATCH_IMAGE_ID_AFTER_FETCH = "image-id-after-fetch"
# The backup is named by the first run's ID, so it survives `temporal workflow reset`.
PATCH_REBUILD_ID = "rebuild-id-survives-reset"
# A cleanup error no retry fixes is reported with the rebuilt result instead of failing the rebuild.
PATCH_CLEANUP_NEVER_FAILS = "cleanup-never-fails-a-rebuild"
# A fleet's prefetch refuses a request whose disk format contradicts the Glance record (the rebuild
# always did), instead of letting every child fail at resolve.
PATCH_PREFETCH_REFUSES_CONTRADICTION = "prefetch-refuses-a-format-glance-contradicts"
# The new root disk is written before the stop (stage), so the downtime keeps only the swap.
PATCH_STAGE_BEFORE_STOP = "stage-root-disk-before-stop"
# A request that names no image is rebuilt from the instance's recorded one, or refused after inspect.
PATCH_CURRENT_IMAGE = "current-image-by-default"
# Stop, prepare and start run as one activity (swap_root_disk) where the host has it and no seed goes
# between: no workflow round trip inside the downtime.
PATCH_SWAP_IN_ONE_STEP = "swap-root-disk-in-one-step"
# Cleanup's two host steps (remove_backup, record_image) run as one activity (clean_up_rebuild) where the
# host has it and no seed backup goes between them.
PATCH_CLEAN_UP_IN_ONE_STEP = "clean-up-in-one-step"
# A fleet waits for its update handlers (an abort signalling children) before it ends.
PATCH_FLEET_WAITS_FOR_HANDLERS = "fleet-waits-for-its-handlers"


HOST_QUEUE_PREFIX = "rebuild-host-"


def host_task_queue(host: str) -> str:
    """The queue polled only by the worker on ``host``: host activities must run where the disk is."""
    return f"{HOST_QUEUE_PREFIX}{host}"


def host_of_queue(queue: str) -> str:
    """The host whose queue ``queue`` is (an activity's own task queue names its hypervisor)."""
    return queue.removeprefix(HOST_QUEUE_PREFIX)


def rebuild_workflow_id(host: str, instance: str) -> str:
    """One rebuild per instance at a time: the ID is the lock.

    Host names cannot hold ``:``, so the first ``:`` after the prefix ends the host: host ``kvm`` with
    instance ``1-web`` and host ``kvm-1`` with instance ``web`` get different IDs (they did not under
    the legacy form below).
    """
    return f"rebuild:{host}:{instance}"


def legacy_rebuild_workflow_id(host: str, instance: str) -> str:
    """The ID rebuilds had before 2026-11: still found by status, and still a lock while one runs."""
    return f"rebuild-{host}-{instance}"


def fleet_workflow_id(name: str) -> str:
    return f"fleet:{name}"


# How long `rebuild instances` waits for a host's worker to take its listing before it reports the host
# as not answering (no retry helps a queue nobody polls).
DEFAULT_ANSWER_WITHIN_SECONDS = 4.0
