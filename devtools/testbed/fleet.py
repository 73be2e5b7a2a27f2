"""Simulated hosts for fleet tests and the fleet bench: each host its own libvirt ``test:///`` node with
real disk files, its own state directory with the image already cached, and its own worker running the
real host activities (real qemu-img). Failures are injected at the boot check, so a failing rebuild
really rolls back its disk.

A tracker wrapped around stop and start records which instances are down at every moment, so tests
check the unavailability limits from what the hosts saw.
"""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager, suppress
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from temporalio import activity
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client, WorkflowHandle
from temporalio.exceptions import ApplicationError
from temporalio.worker import Worker

from activities.state import StateDir
from devtools.guest import write_image
from devtools.testbed.e2e import LOOPBACK_NETWORKS
from devtools.testbed.libvirt_test_driver import DriverInstance, make_instances
from worker import WorkerConfig, host_activities
from workflows.fleet import FleetRebuild
from workflows.fleet_models import (
    FleetLimits,
    FleetRequest,
    RebuildOptions,
    Selection,
    fleet_workflow_id,
)
from workflows.models import (
    CleanUpInput,
    InspectInstanceInput,
    InstanceInfo,
    PreparedRootDisk,
    PrepareRootDiskInput,
    RecordImageInput,
    StartInstanceInput,
    StartResult,
    StopInstanceInput,
    StopResult,
    SwapRootDiskInput,
    SwapRootDiskResult,
    VerifyInstanceInput,
    host_task_queue,
)
from workflows.rebuild import RebuildInstance

IMAGE_URL = "http://images.invalid/fleet.qcow2"


@dataclass
class DownTracker:
    """Which instances are off between a rebuild's stop and its start, as the hosts saw it."""

    down: set[tuple[str, str]] = field(default_factory=set)
    max_down: int = 0
    max_down_per_host: Counter[str] = field(default_factory=Counter)
    stops: list[str] = field(default_factory=list)
    starts: list[tuple[float, str]] = field(default_factory=list)
    # Instances between their rebuild's first step (inspect) and its last (record image).
    busy: set[tuple[str, str]] = field(default_factory=set)
    max_busy: int = 0
    max_busy_per_host: Counter[str] = field(default_factory=Counter)

    def began(self, host: str, instance: str) -> None:
        self.busy.add((host, instance))
        self.max_busy = max(self.max_busy, len(self.busy))
        on_host = sum(1 for h, _ in self.busy if h == host)
        self.max_busy_per_host[host] = max(self.max_busy_per_host[host], on_host)

    def ended(self, host: str, instance: str) -> None:
        self.busy.discard((host, instance))

    def stopped(self, host: str, instance: str) -> None:
        self.stops.append(instance)
        self.down.add((host, instance))
        self.max_down = max(self.max_down, len(self.down))
        on_host = sum(1 for h, _ in self.down if h == host)
        self.max_down_per_host[host] = max(self.max_down_per_host[host], on_host)

    def started(self, host: str, instance: str) -> None:
        self.down.discard((host, instance))
        self.starts.append((time.monotonic(), instance))


@dataclass
class Gate:
    """Holds one instance's prepare step until released (or until its rebuild is cancelled)."""

    instance: str
    reached: asyncio.Event = field(default_factory=asyncio.Event)
    released: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class SimulatedFleet:
    client: Client
    queue: str
    hosts: dict[str, list[DriverInstance]]
    sha256: str
    tracker: DownTracker
    failing: set[str]
    gate: Gate | None = None
    inspected: list[str] = field(default_factory=list)

    def request(self, name: str, selection: Selection | None = None, **limits: Any) -> FleetRequest:
        history_event_limit = limits.pop("history_event_limit", 10_000)
        prefetch = limits.pop("prefetch", False)
        sha256 = limits.pop("sha256", self.sha256)
        return FleetRequest(
            name=name,
            rebuild=RebuildOptions(image_url=IMAGE_URL, sha256=sha256, stop_timeout_seconds=0),
            selection=selection or Selection(hosts=list(self.hosts), name_pattern="*"),
            limits=FleetLimits(**limits),
            prefetch=prefetch,
            history_event_limit=history_event_limit,
        )

    async def start(self, request: FleetRequest) -> WorkflowHandle[Any, Any]:
        return await self.client.start_workflow(
            "FleetRebuild", request, id=fleet_workflow_id(request.name), task_queue=self.queue
        )

    def image_of(self, host: str, instance: DriverInstance) -> str | None:
        record = instance.libvirt.domain(instance.name).image_record()
        return record.get("sha256") if record is not None else None

    def all_instances(self) -> list[tuple[str, DriverInstance]]:
        return [(host, vm) for host, vms in self.hosts.items() for vm in vms]

    def half_done(self) -> list[str]:
        """Instances that are not whole: off, or with a rebuild's leftovers next to their disk."""
        problems = []
        for _host, vm in self.all_instances():
            if not vm.libvirt.domain(vm.name).is_active():
                problems.append(f"{vm.name} is off")
            leftovers = list(vm.disk.parent.glob(f"{vm.disk.name}.rebuild-*"))
            if leftovers:
                problems.append(f"{vm.name} has {leftovers}")
        return problems


def _named(activities: list[Callable[..., Any]], name: str) -> Callable[..., Any]:
    return next(a for a in activities if activity._Definition.must_from_callable(a).name == name)


def _wrapped(host: str, real: list[Callable[..., Any]], fleet: SimulatedFleet) -> list[Callable[..., Any]]:
    stop, start = _named(real, "stop_instance"), _named(real, "start_instance")
    verify, prepare = _named(real, "verify_instance"), _named(real, "prepare_root_disk")
    inspect, record = _named(real, "inspect_instance"), _named(real, "record_image")
    clean_up, swap = _named(real, "clean_up_rebuild"), _named(real, "swap_root_disk")

    @activity.defn(name="inspect_instance")
    async def inspect_instance(request: InspectInstanceInput) -> InstanceInfo:
        fleet.inspected.append(request.instance)
        fleet.tracker.began(host, request.instance)
        info: InstanceInfo = await inspect(request)
        # Three steps, each seen by the tracker and the gate on prepare; the one-step swap is the real
        # worker's (test_disks, test_faults, test_fleet_end_to_end).
        return info.model_copy(update={"swaps_in_one_step": False})

    @activity.defn(name="record_image")
    async def record_image(request: RecordImageInput) -> None:
        await record(request)
        fleet.tracker.ended(host, request.instance)

    @activity.defn(name="swap_root_disk")
    async def swap_root_disk(request: SwapRootDiskInput) -> SwapRootDiskResult:
        # Stop, prepare and start in one: counted down for the whole activity (never less than it was).
        fleet.tracker.stopped(host, request.stop.instance)
        result: SwapRootDiskResult = await swap(request)
        fleet.tracker.started(host, request.start.instance)
        return result

    @activity.defn(name="clean_up_rebuild")
    async def clean_up_rebuild(request: CleanUpInput) -> None:
        await clean_up(request)
        fleet.tracker.ended(host, request.record.instance)

    @activity.defn(name="stop_instance")
    async def stop_instance(request: StopInstanceInput) -> StopResult:
        result: StopResult = await stop(request)
        fleet.tracker.stopped(host, request.instance)
        return result

    @activity.defn(name="start_instance")
    async def start_instance(request: StartInstanceInput) -> StartResult:
        result: StartResult = await start(request)
        fleet.tracker.started(host, request.instance)
        return result

    @activity.defn(name="verify_instance")
    async def verify_instance(request: VerifyInstanceInput) -> None:
        if request.instance in fleet.failing:
            raise ApplicationError(
                f"{request.instance} failed its boot check (injected)",
                type="BootCheckFailed",
                non_retryable=True,
            )
        await verify(request)

    @activity.defn(name="prepare_root_disk")
    async def prepare_root_disk(request: PrepareRootDiskInput) -> PreparedRootDisk:
        gate = fleet.gate
        if gate is not None and gate.instance == request.instance and not gate.released.is_set():
            gate.reached.set()
            while not gate.released.is_set():
                activity.heartbeat()
                with suppress(TimeoutError):
                    await asyncio.wait_for(gate.released.wait(), 0.2)
        prepared: PreparedRootDisk = await prepare(request)
        return prepared

    mine: list[Callable[..., Any]] = [
        inspect_instance,
        stop_instance,
        start_instance,
        verify_instance,
        prepare_root_disk,
        record_image,
        clean_up_rebuild,
        swap_root_disk,
    ]
    replaced = {activity._Definition.must_from_callable(a).name for a in mine}
    keep = [a for a in real if activity._Definition.must_from_callable(a).name not in replaced]
    return [*keep, *mine]


def make_hosts(
    root: Path, prefix: str, hosts: int, per_host: int, names: str = "vm", disk_size: int = 1 << 20
) -> dict[str, Any]:
    """Node files and state directories for ``hosts`` hosts, the image cached on each."""
    image = write_image(root / "image.qcow2", "image B", fmt="qcow2", size=1 << 20)
    sha = hashlib.sha256(image.read_bytes()).hexdigest()
    made: dict[str, Any] = {"sha256": sha, "hosts": {}, "states": {}}
    for number in range(hosts):
        host = f"{prefix}-h{number}"
        directory = root / host
        directory.mkdir()
        names_here = [f"{names}-{number}-{i:04d}" for i in range(per_host)]
        instances = make_instances(directory, names_here, disk_size=disk_size)
        state = StateDir(directory / "state")
        state.create()
        shutil.copyfile(image, state.image_path(sha))
        made["hosts"][host] = instances
        made["states"][host] = state
    return made


@asynccontextmanager
async def simulated_fleet(
    client: Client,
    root: Path,
    prefix: str,
    hosts: int = 3,
    per_host: int = 4,
    failing: set[str] | None = None,
    workflow_worker: bool = True,
    max_concurrent_activities: int = 100,
    queue: str | None = None,
    disk_size: int = 1 << 20,
) -> AsyncIterator[SimulatedFleet]:
    made = make_hosts(root, prefix, hosts, per_host, disk_size=disk_size)
    fleet = SimulatedFleet(
        client=client,
        queue=queue or f"fleet-wf-{prefix}",
        hosts=made["hosts"],
        sha256=made["sha256"],
        tracker=DownTracker(),
        failing=failing or set(),
    )
    async with AsyncExitStack() as stack:
        for host, instances in fleet.hosts.items():
            state: StateDir = made["states"][host]
            config = WorkerConfig(
                host=host,
                libvirt_uri=instances[0].libvirt.uri,
                state_dir=state.root,
                allowed_image_networks=LOOPBACK_NETWORKS,
            )
            activities = _wrapped(host, host_activities(config, instances[0].libvirt), fleet)
            await stack.enter_async_context(
                Worker(
                    client,
                    task_queue=host_task_queue(host),
                    activities=activities,
                    max_concurrent_activities=max_concurrent_activities,
                    max_heartbeat_throttle_interval=timedelta(milliseconds=200),
                )
            )
        if workflow_worker:
            await stack.enter_async_context(
                Worker(
                    client,
                    task_queue=fleet.queue,
                    workflows=[FleetRebuild, RebuildInstance],
                    max_concurrent_workflow_tasks=100,
                )
            )
        yield fleet


async def down_interval(client: Client, workflow_id: str) -> tuple[datetime, datetime] | None:
    """From the child's history: its first stop scheduled to its last start (or undo start) done;
    ``swap_root_disk`` (stop, prepare and start in one) counts as both, its whole span as down."""
    history = await client.get_workflow_handle(workflow_id).fetch_history()
    names: dict[int, str] = {}
    first_stop: datetime | None = None
    last_start: datetime | None = None
    for event in history.events:
        if event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
            name = event.activity_task_scheduled_event_attributes.activity_type.name
            names[event.event_id] = name
            if name in ("stop_instance", "swap_root_disk") and first_stop is None:
                first_stop = event.event_time.ToDatetime()
        elif event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_COMPLETED:
            scheduled = event.activity_task_completed_event_attributes.scheduled_event_id
            if names.get(scheduled) in ("start_instance", "swap_root_disk"):
                last_start = event.event_time.ToDatetime()
    if first_stop is None:
        return None
    if last_start is None or last_start < first_stop:
        raise AssertionError(f"{workflow_id}: stopped and never started again")
    return first_stop, last_start


def max_overlap(intervals: list[tuple[datetime, datetime]]) -> int:
    # At equal times an end comes before a start: touching intervals do not overlap.
    points = sorted([(a, 1) for a, _ in intervals] + [(b, -1) for _, b in intervals])
    current = peak = 0
    for _, step in points:
        current += step
        peak = max(peak, current)
    return peak
