"""The downtime in one activity: stop, prepare (the swap) and start, with no workflow round trip between.

Each round trip through Temporal (the activity's result, a workflow task, the next activity's dispatch)
costs 50-130 ms here, twice inside the window when the three steps are activities of their own. Here they
are the very same code (``HypervisorActivities.stop`` / ``.start``, ``DiskActivities.prepare_root_disk``,
their kill points included), run one after the other; the activity is as idempotent as its parts:

- a retry before the start finds the instance off (the stop's success) and the swap begun (prepare
  finishes what it began, the backup never replaced);
- a retry after the start finds this rebuild's start record, and the instance running that boot: it
  neither stops it again nor touches its disk, and returns how the first attempt's stop went.

A cancel (an abort) interrupts the stop's graceful wait, but never prepare or start midway: their
undos must not race them, so a part under way runs to its end and the cancel is raised after it, and
start does not begin once the cancel is known.

A failure names the part it came from (its details: ``{"step": "stop" | "prepare" | "start"}``), so the
rebuild says where it failed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import ParamSpec, TypeVar

from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.disks import DiskActivities
from activities.heartbeat import keep_alive
from activities.hypervisor import HypervisorActivities
from workflows import activity_models as io

P = ParamSpec("P")
T = TypeVar("T")


class SwapActivities:
    def __init__(self, hypervisor: HypervisorActivities, disks: DiskActivities) -> None:
        self.hypervisor = hypervisor
        self.disks = disks

    @activity.defn
    async def swap_root_disk(self, request: io.SwapRootDiskInput) -> io.SwapRootDiskResult:
        rebuild_id = request.prepare.rebuild_id
        instance = request.prepare.instance
        if request.start.instance != instance or request.stop.instance != instance:
            raise ApplicationError("stop, prepare and start must name one instance", type="InvalidRequest",
                                   non_retryable=True)  # fmt: skip
        start = request.start.model_copy(update={"rebuild_id": rebuild_id})
        hypervisor = self.hypervisor
        # Before the stop, not inside the window: the start records' directory and its pruning.
        record = await _part("start", asyncio.to_thread, hypervisor._start_record_path, rebuild_id)
        await _part("start", asyncio.to_thread, hypervisor.prepare_start_records, record)
        done = await _part("start", asyncio.to_thread, hypervisor.started_by, rebuild_id, instance)
        if done is not None:
            started = io.StartResult(started_at=datetime.now(UTC), already_running=True)
            prepared = io.PreparedRootDisk(disk_path="", backup_path="", virtual_size=0)
            return io.SwapRootDiskResult(stopped=done, prepared=prepared, started=started)
        # Before the stop too: the definition that names the serial log the start record reads.
        definition = await _part("start", asyncio.to_thread, hypervisor.libvirt.domain(instance).definition)
        # The stop heartbeats while it waits for the guest; prepare and start under keep_alive.
        stopped = await _part("stop", hypervisor.stop, request.stop, False)
        async with keep_alive():
            began = time.perf_counter()
            prepared = await _to_its_end(_part("prepare", self.disks.prepare_root_disk, request.prepare))
            between = time.perf_counter()
            if activity.is_cancelled():
                raise asyncio.CancelledError()
            started = await _to_its_end(_part("start", hypervisor.start, start, stopped, definition))
            ended = time.perf_counter()
        return io.SwapRootDiskResult(
            stopped=stopped,
            prepared=prepared,
            started=started,
            prepare_seconds=between - began,
            start_seconds=ended - between,
        )


async def _to_its_end(part: Awaitable[T]) -> T:
    """``part``, finished even when a cancel comes meanwhile; the cancel is raised once it is over."""
    task = asyncio.ensure_future(part)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        await asyncio.wait([task])
        if not task.cancelled():
            task.exception()  # the cancel is what this activity reports; its error is not lost unread
        raise


async def _part(step: str, call: Callable[P, Awaitable[T]], *args: P.args, **kwargs: P.kwargs) -> T:
    """``call(*args)``; what it raises carries ``step`` in its details."""
    try:
        return await call(*args, **kwargs)
    except ApplicationError as err:
        raise ApplicationError(
            err.message, {"step": step}, type=err.type, non_retryable=err.non_retryable
        ) from None
