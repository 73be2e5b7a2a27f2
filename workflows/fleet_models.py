"""What crosses Temporal for a fleet: the rolling rebuild of many instances on many hosts.

The ``FleetRebuild`` workflow owns these models, as ``RebuildInstance`` owns ``workflows/models.py``.
Wire models (``workflows/wire.py``): they ignore fields they do not know and check nothing beyond their
types, so a newer client or a check tightened later never breaks a running fleet, nor its replay. The
``Strict*`` models at the end are what the CLI and the HTTP API build and check. The state a run
carries into its successor (``FleetProgress``) holds one short entry per instance, so 10,000 instances
stay far below Temporal's 2 MB payload limit.
"""

from __future__ import annotations

import fnmatch
from datetime import datetime
from enum import StrEnum

from pydantic import ConfigDict, Field, ValidationError, field_validator, model_validator

from workflows.activity_models import HostInventory, InventoryEntry, ListInstancesInput
from workflows.checks import HostName, InstanceName, RequestedBy, check_host_name, check_instance_name
from workflows.fleet_states import InstanceState
from workflows.identity import IdentityChange, identity_problems
from workflows.models import DiskFormat, RebuildRequest, StrictRebuildRequest
from workflows.names import FLEET_WORKFLOW, fleet_workflow_id
from workflows.wire import Wire

__all__ = [
    "FLEET_WORKFLOW",
    "HostInventory",
    "InstanceState",
    "InventoryEntry",
    "ListInstancesInput",
    "fleet_workflow_id",
]

FLEET_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$"
# Errors kept per instance are cut to this: the carried state must stay small.
MAX_NOTE = 300
# A run continues as new after this many events at the latest (Temporal refuses a history of 51,200).
DEFAULT_HISTORY_EVENT_LIMIT = 10_000


# What the failure budget counts: a rebuild that was rolled back, or failed (with nothing changed, or
# with a rollback that needs a person).
FAILURES = frozenset({InstanceState.ROLLED_BACK, InstanceState.FAILED})
FINISHED = frozenset(InstanceState) - {InstanceState.WAITING, InstanceState.RUNNING}


class FleetPhase(StrEnum):
    DISCOVER = "discover"
    PREFETCH = "prefetch"
    ROLLING = "rolling"
    STOPPING = "stopping"
    DONE = "done"


class FleetTarget(Wire):
    host: str
    instance: str

    @property
    def key(self) -> str:
        # Host names hold no ':', so this names one instance on one host.
        return f"{self.host}:{self.instance}"


class RebuildOptions(Wire):
    """Everything of a ``RebuildRequest`` but the instance and its host: the same for every child."""

    image_url: str | None = None
    sha256: str | None = None
    sha512: str | None = None
    disk_format: DiskFormat | None = None
    glance_url: str | None = None
    glance_image_id: str | None = None
    start_after: bool | None = None
    stop_timeout_seconds: float = 60.0
    boot_marker: str | None = None
    boot_timeout_seconds: float = 120.0
    max_virtual_size_bytes: int = 1 << 40
    requested_by: str = "unknown"
    # Each rebuild boots the new image in a sandbox before its stop; None: the host worker's default.
    preflight: bool | None = None
    # A file root disk's new disk: overlay or copy; None: each host worker's default.
    disk_mode: str | None = None
    # As a single rebuild's (``RebuildRequest``), the same for every child: how each proves it booted,
    # whether each waits for its own `approve`, keeps its old disk for a confirm window, and the
    # identity every guest gets (never a per-instance one such as a host name).
    verify: str | None = None
    require_approval: bool = False
    approval_timeout_seconds: float = 3600.0
    confirm_within_seconds: float | None = None
    revert_by_default: bool = False
    identity: IdentityChange | None = None

    def request_for(self, target: FleetTarget) -> RebuildRequest:
        return RebuildRequest(instance=target.instance, host=target.host, **self.model_dump())

    @property
    def image_label(self) -> str:
        return self.image_url or f"glance:{self.glance_image_id}"


class Selection(Wire):
    """Which instances: an explicit list, or the hosts' own listings filtered by a name pattern."""

    hosts: list[str] = Field(default_factory=list)
    # fnmatch pattern on instance names, applied to what each host's worker reports.
    name_pattern: str | None = None
    instances: list[FleetTarget] = Field(default_factory=list)

    def all_hosts(self) -> list[str]:
        return list(dict.fromkeys([*self.hosts, *(t.host for t in self.instances)]))

    def matches(self, instance: str) -> bool:
        return self.name_pattern is not None and fnmatch.fnmatchcase(instance, self.name_pattern)


class FleetLimits(Wire):
    batch_size: int = 10
    # Never more than this many instances in a rebuild (and so possibly down) at once.
    max_unavailable: int = 1
    # Never more than this many rebuilds at once on one host; None: only max_unavailable.
    per_host: int | None = None
    # Stop starting rebuilds once this many have failed.
    max_failures: int = 1
    # True: never more rebuilds running than failures the budget can still absorb, so the fleet stops at
    # exactly max_failures. False: up to max_unavailable regardless; the rebuilds running when the
    # budget is spent finish and may fail too.
    exact_budget: bool = True
    pause_between_seconds: float = 0.0


class FleetProgress(Wire):
    """What a run hands to the run it continues as: the instances, their states, the controls.

    The workflow writes it itself, one state per target (``workflows/fleet_plan.py``).
    """

    targets: list[FleetTarget]
    states: list[InstanceState]
    # Why an instance was skipped or failed, by index (only those with something to say).
    notes: dict[int, str] = Field(default_factory=dict)
    batch_start: int = 0
    batch_end: int = 0
    batch_number: int = 0
    limits: FleetLimits
    paused: bool = False
    abort_reason: str | None = None
    image_sha256: str | None = None
    runs: int = 1
    started_at: datetime | None = None


class FleetRequest(Wire):
    name: str
    rebuild: RebuildOptions
    # None only in a run that continues another: its carried targets are the selection, once.
    selection: Selection | None
    limits: FleetLimits = Field(default_factory=FleetLimits)
    # Fetch and check the image on every host before the first instance stops.
    prefetch: bool = False
    history_event_limit: int = DEFAULT_HISTORY_EVENT_LIMIT
    # Set only when a run continues as new.
    carried: FleetProgress | None = None


class FleetInstance(Wire):
    host: str
    instance: str
    state: InstanceState
    note: str | None = None
    workflow_id: str


class FleetCounts(Wire):
    total: int = 0
    waiting: int = 0
    running: int = 0
    rebuilt: int = 0
    rolled_back: int = 0
    failed: int = 0
    skipped: int = 0
    aborted: int = 0

    @property
    def failures(self) -> int:
        return self.rolled_back + self.failed

    @property
    def finished(self) -> int:
        return self.total - self.waiting - self.running


class FleetStatus(Wire):
    name: str
    phase: FleetPhase
    paused: bool
    image: str
    image_sha256: str | None = None
    limits: FleetLimits
    counts: FleetCounts
    batch_number: int
    batches: int
    running: list[FleetInstance]
    # Failed and rolled-back instances, newest last, at most 100.
    problems: list[FleetInstance]
    abort_reason: str | None = None
    stop_reason: str | None = None
    runs: int = 1
    history_length: int = 0
    started_at: datetime | None = None


class InstancesPage(Wire):
    """The ``instances`` query's argument: one page of instances, optionally of one state."""

    state: InstanceState | None = None
    offset: int = 0
    limit: int = 1000


class FleetInstances(Wire):
    total: int
    items: list[FleetInstance]


class FleetReport(Wire):
    name: str
    counts: FleetCounts
    # None: every selected instance was dealt with.
    stop_reason: str | None = None
    problems: list[FleetInstance]
    runs: int


class FleetAbort(Wire):
    reason: str
    requested_by: str = "unknown"


class BatchSize(Wire):
    batch_size: int


class ControlAnswer(Wire):
    accepted: bool
    message: str
    paused: bool
    batch_size: int


# ---- at the edges ------------------------------------------------------------------------------
# What a person or a service sends is checked strictly: a misspelt limit must not pass unnoticed as its
# default. Each keeps its wire model's name in the OpenAPI document.


class StrictFleetTarget(FleetTarget):
    model_config = ConfigDict(extra="forbid", frozen=True, title="FleetTarget")

    host: HostName
    instance: InstanceName


class StrictRebuildOptions(RebuildOptions):
    model_config = ConfigDict(extra="forbid", frozen=True, title="RebuildOptions")

    stop_timeout_seconds: float = Field(default=60.0, ge=0, le=3600)
    boot_marker: str | None = Field(default=None, min_length=1, max_length=200)
    boot_timeout_seconds: float = Field(default=120.0, gt=0, le=3600)
    max_virtual_size_bytes: int = Field(default=1 << 40, gt=0)
    requested_by: RequestedBy = "unknown"

    @model_validator(mode="after")
    def _valid_for_a_rebuild(self) -> StrictRebuildOptions:
        # The image fields are checked exactly as a single rebuild checks them, once, at the edge.
        if self.image_url is None and self.glance_image_id is None and self.glance_url is None:
            # Each instance's own current image is no fleet's image: a fleet names the one it rolls out.
            raise ValueError("name the fleet's image by `image_url` or `glance_image_id` (with `glance_url`)")
        if self.identity is not None:
            named = [
                f"`{field}`" for field in ("hostname", "name", "description") if getattr(self.identity, field)
            ]
            if named:
                raise ValueError(
                    f"a fleet gives every guest the same identity: no per-guest {', '.join(named)}"
                )
            if problems := identity_problems(self.identity):
                raise ValueError("; ".join(problems))
        try:
            StrictRebuildRequest(instance="i", host="h", **self.model_dump())
        except ValidationError as exc:
            raise ValueError(
                "; ".join(
                    (f"`{e['loc'][0]}`: " if e["loc"] else "") + e["msg"].removeprefix("Value error, ")
                    for e in exc.errors()
                )
            ) from None
        return self


class StrictSelection(Selection):
    model_config = ConfigDict(extra="forbid", frozen=True, title="Selection")

    hosts: list[HostName] = Field(default_factory=list)
    name_pattern: str | None = Field(default=None, min_length=1, max_length=200)

    @field_validator("hosts")
    @classmethod
    def _each_host_once(cls, value: list[str]) -> list[str]:
        return list(dict.fromkeys(value))

    @field_validator("instances")
    @classmethod
    def _usable_names(cls, value: list[FleetTarget]) -> list[FleetTarget]:
        for target in value:
            check_host_name(target.host)
            check_instance_name(target.instance)
        return value

    @model_validator(mode="after")
    def _one_way(self) -> StrictSelection:
        if (self.name_pattern is None) == (not self.instances):
            raise ValueError("select instances either by a list or by a name pattern on hosts, not both")
        if self.name_pattern is not None and not self.hosts:
            raise ValueError("a name pattern needs the hosts whose instances it selects")
        keys = [t.key for t in self.instances]
        if len(keys) != len(set(keys)):
            raise ValueError("an instance is listed twice")
        return self


class StrictFleetLimits(FleetLimits):
    model_config = ConfigDict(extra="forbid", frozen=True, title="FleetLimits")

    batch_size: int = Field(default=10, ge=1, le=100_000)
    max_unavailable: int = Field(default=1, ge=1, le=10_000)
    per_host: int | None = Field(default=None, ge=1, le=10_000)
    max_failures: int = Field(default=1, ge=1, le=100_000)
    pause_between_seconds: float = Field(default=0.0, ge=0, le=7 * 86400)


class StrictFleetRequest(FleetRequest):
    """A new fleet as a caller asks for it: strict, and never with carried state."""

    model_config = ConfigDict(extra="forbid", frozen=True, title="FleetRequest")
    name: str = Field(pattern=FLEET_NAME_PATTERN)
    rebuild: StrictRebuildOptions
    selection: StrictSelection
    limits: StrictFleetLimits = Field(default_factory=StrictFleetLimits)
    history_event_limit: int = Field(default=DEFAULT_HISTORY_EVENT_LIMIT, ge=20, le=40_000)
    carried: None = None

    def wire(self) -> FleetRequest:
        return FleetRequest.model_validate(self.model_dump())


class StrictInstancesPage(InstancesPage):
    model_config = ConfigDict(extra="forbid", frozen=True, title="InstancesPage")

    offset: int = Field(default=0, ge=0)
    limit: int = Field(default=1000, ge=1, le=5000)


class StrictFleetAbort(FleetAbort):
    model_config = ConfigDict(extra="forbid", frozen=True, title="FleetAbort")

    reason: str = Field(min_length=1, max_length=500)
    requested_by: RequestedBy = "unknown"


class StrictBatchSize(BatchSize):
    model_config = ConfigDict(extra="forbid", frozen=True, title="BatchSize")

    batch_size: int = Field(ge=1, le=100_000)
