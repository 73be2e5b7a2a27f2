"""The rebuild's own models: what an operator asks for, what the rebuild says while it runs and at its end.

``RebuildInstance`` owns them. ``StrictRebuildRequest``, ``StrictAbortRequest`` and ``StrictDecision`` are
their forms at the edges (the CLI, the HTTP API), checked before anything crosses Temporal; the wire
forms are not, see ``workflows/wire.py``. The activities' inputs and outputs live in
``workflows/activity_models.py``, the names of workflows, handlers and queues in ``workflows/names.py``,
the edge checks in ``workflows/checks.py``: they are re-exported here for the code that imports them
from ``workflows.models``.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from urllib.parse import urlsplit

from pydantic import ConfigDict, Field, ValidationInfo, field_validator, model_validator

# The star imports re-export what used to be defined here, for the code that imports it from here.
from workflows.activity_models import *  # noqa: F403
from workflows.activity_models import DISK_MODES, DiskFormat, DiskMode, StopMethod, VerifySpec
from workflows.checks import *  # noqa: F403
from workflows.checks import (
    DISK_TARGET,
    GLANCE_IMAGE_ID,
    SHA256_HEX,
    SHA512_HEX,
    HostName,
    InstanceName,
    RequestedBy,
)
from workflows.identity import IdentityChange
from workflows.names import *  # noqa: F403
from workflows.plan_models import RebuildPlan
from workflows.snapshot_models import SNAPSHOT_ID
from workflows.wire import Wire


class Phase(StrEnum):
    """A phase has one name everywhere: status query, search attribute, CLI output."""

    PENDING = "pending"
    INSPECT = "inspect"
    RESOLVE = "resolve"
    FETCH = "fetch"
    CHECK = "check"
    PREFLIGHT = "preflight"
    AWAIT_APPROVAL = "await-approval"
    STOP = "stop"
    STAGE = "stage"
    PREPARE = "prepare"
    SEED = "seed"
    START = "start"
    VERIFY = "verify"
    CONFIRM_WINDOW = "confirm-window"
    CLEANUP = "cleanup"
    ROLLBACK = "rollback"
    DONE = "done"
    # A dry run: the back end is asked how it would make the new disk; then it ends, nothing changed.
    PLAN = "plan"
    PLANNED = "planned"
    ROLLED_BACK = "rolled-back"
    FAILED = "failed"


class Outcome(StrEnum):
    REBUILT = "rebuilt"
    ROLLED_BACK = "rolled-back"
    UNCHANGED = "unchanged"
    ROLLBACK_FAILED = "rollback-failed"
    # A dry run's end: the plan is in the result, nothing was changed.
    PLANNED = "planned"


class RebuildRequest(Wire):
    """What an operator asks for. Nothing here names a disk path: those come from libvirt.

    The image is named either by ``image_url`` (http, https, or file:// inside the worker's allowed
    directory) or by a Glance v2 image ID plus the image service's URL. This is its shape on the wire;
    :class:`StrictRebuildRequest` is what the CLI and the API check before a rebuild starts.
    """

    instance: str
    host: str
    image_url: str | None = None
    sha256: str | None = None
    # None: start the instance again only when it was running before the rebuild.
    start_after: bool | None = None
    stop_timeout_seconds: float = 60.0
    boot_marker: str | None = None
    boot_timeout_seconds: float = 120.0
    # agent, console:REGEX or running:SECONDS; None: the boot marker if given, else agent where the
    # domain has a guest agent channel, else running for a few seconds.
    verify: str | None = None
    max_virtual_size_bytes: int = 1 << 40
    requested_by: str = "unknown"
    sha512: str | None = None
    # When given, an image whose header says otherwise is refused.
    disk_format: DiskFormat | None = None
    glance_url: str | None = None
    glance_image_id: str | None = None
    # Wait for an `approve` signal after fetch and check, before anything changes.
    require_approval: bool = False
    approval_timeout_seconds: float = 3600.0
    # Keep the old disk after the new one boots until `confirm`, `revert` or the window's end.
    confirm_within_seconds: float | None = None
    revert_by_default: bool = False
    # The guest's identity through cloud-init (Nova's key_name, user_data, hostname, ...): None keeps
    # what the instance has. Its password arrives hashed; user data may be secret (see the codec).
    identity: IdentityChange | None = None
    # Boot the new image in a throwaway sandbox before the stop; None: the host worker's default.
    preflight: bool | None = None
    # A file root disk's new disk: "overlay" (qcow2 on the cached image, constant time) or "copy" (a
    # standalone disk in the old disk's format: raw stays raw); None: the host worker's default.
    disk_mode: str | None = None
    # The root disk's target device (vda, sda, ...) where the boot order leaves it ambiguous; None:
    # the disk that comes first in the domain's boot order.
    root_disk: str | None = None
    # Drop the instance's snapshots (their metadata once the rebuild is confirmed; their data lives in
    # the old disk, kept until cleanup so a rollback brings them back). Without it they are refused.
    discard_snapshots: bool = False
    # The image is a snapshot on the instance's host (``rebuild snapshot create``), by its ID.
    snapshot_id: str | None = None
    # Inspect, fetch, check (and pre-flight when asked), then end with the plan: nothing is changed.
    dry_run: bool = False

    @property
    def image_label(self) -> str:
        """How the image is shown to people: its URL, its Glance ID, or the snapshot's ID."""
        if self.snapshot_id is not None:
            return f"snapshot:{self.snapshot_id}"
        if self.names_no_image:
            return "(the instance's current image)"
        return self.image_url or f"glance:{self.glance_image_id}"

    @property
    def names_no_image(self) -> bool:
        """No image named: the rebuild reuses the one the instance's metadata records ("reinstall")."""
        return self.image_url is None and self.glance_image_id is None and self.snapshot_id is None


class StrictRebuildRequest(RebuildRequest):
    """A rebuild request as the CLI and the API accept it: names, URLs, digests and limits checked."""

    model_config = ConfigDict(extra="forbid", frozen=True, title="RebuildRequest")

    instance: InstanceName
    host: HostName
    requested_by: RequestedBy = "unknown"
    stop_timeout_seconds: float = Field(default=60.0, ge=0, le=3600)
    boot_marker: str | None = Field(default=None, min_length=1, max_length=200)
    boot_timeout_seconds: float = Field(default=120.0, gt=0, le=3600)
    verify: str | None = Field(default=None, max_length=300)
    max_virtual_size_bytes: int = Field(default=1 << 40, gt=0)
    approval_timeout_seconds: float = Field(default=3600.0, gt=0, le=7 * 86400)
    confirm_within_seconds: float | None = Field(default=None, gt=0, le=30 * 86400)
    root_disk: str | None = Field(default=None, pattern=DISK_TARGET.pattern)
    disk_mode: DiskMode | None = None

    @field_validator("image_url")
    @classmethod
    def _image_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = urlsplit(value)
        if parts.scheme == "file":
            if parts.netloc or not parts.path.startswith("/"):
                raise ValueError(f"file URL must be file:///absolute/path: {value!r}")
            return value
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"image URL must be http://, https:// or file:///: {value!r}")
        return value

    @field_validator("verify")
    @classmethod
    def _verify(cls, value: str | None) -> str | None:
        return None if value is None else VerifySpec.parse(value).label()

    @field_validator("disk_mode", mode="before")
    @classmethod
    def _disk_mode(cls, value: object) -> object:
        if value is not None and value not in DISK_MODES:
            raise ValueError(f"disk mode must be {' or '.join(DISK_MODES)}, not {str(value)[:40]!r}")
        return value

    @field_validator("glance_url")
    @classmethod
    def _glance_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"Glance URL must be http:// or https:// with a host: {value!r}")
        return value.rstrip("/")

    @field_validator("glance_image_id")
    @classmethod
    def _glance_image_id(cls, value: str | None) -> str | None:
        if value is not None and not GLANCE_IMAGE_ID.fullmatch(value):
            raise ValueError(f"not a Glance image ID: {value!r}")
        return value

    @field_validator("snapshot_id")
    @classmethod
    def _snapshot_id(cls, value: str | None) -> str | None:
        if value is not None and not SNAPSHOT_ID.fullmatch(value):
            raise ValueError(f"not a snapshot ID (32 lowercase hex digits): {value!r}")
        return value

    @field_validator("sha256", "sha512")
    @classmethod
    def _digest(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return None
        lowered = value.lower()
        pattern, digits = (SHA256_HEX, 64) if info.field_name == "sha256" else (SHA512_HEX, 128)
        if not pattern.fullmatch(lowered):
            raise ValueError(f"must be {digits} hexadecimal characters")
        return lowered

    @model_validator(mode="after")
    def _one_image_source(self) -> StrictRebuildRequest:
        glance = self.glance_image_id is not None or self.glance_url is not None
        if glance and not (self.glance_image_id and self.glance_url):
            raise ValueError("a Glance image needs both `glance_image_id` and `glance_url`")
        named = [glance, self.image_url is not None, self.snapshot_id is not None]
        if named.count(True) > 1:
            raise ValueError(
                "name the image by exactly one of: `image_url`, `glance_image_id` (with `glance_url`), "
                "`snapshot_id` (or none: the instance's current image)"
            )
        if not any(named) and (self.sha256 or self.sha512 or self.disk_format):
            raise ValueError(
                "`sha256`, `sha512` and `disk_format` go with the image they describe: the current image "
                "is rebuilt with its recorded digest"
            )
        return self

    @model_validator(mode="after")
    def _one_boot_check(self) -> StrictRebuildRequest:
        if self.boot_marker is not None and self.verify is not None:
            raise ValueError("give either `boot_marker` or `verify`, not both")
        return self


class AbortRequest(Wire):
    reason: str
    requested_by: str = "unknown"


class StrictAbortRequest(AbortRequest):
    model_config = ConfigDict(extra="forbid", frozen=True, title="AbortRequest")

    reason: str = Field(min_length=1, max_length=500)
    requested_by: RequestedBy = "unknown"


class Decision(Wire):
    """An operator's or a service's word on a waiting rebuild: approve, confirm or revert."""

    reason: str = ""
    requested_by: str = "unknown"


class StrictDecision(Decision):
    model_config = ConfigDict(extra="forbid", frozen=True, title="Decision")

    reason: str = Field(default="", max_length=500)
    requested_by: RequestedBy = "unknown"


class AbortAnswer(Wire):
    accepted: bool
    phase: Phase
    message: str


class PhaseEntered(Wire):
    """One phase of a rebuild and when the workflow entered it."""

    phase: Phase
    at: datetime


class RebuildStatus(Wire):
    instance: str
    host: str
    phase: Phase
    image_url: str | None
    image_sha256: str | None = None
    step_seconds: dict[str, float] = Field(default_factory=dict)
    undo_stack: list[str] = Field(default_factory=list)
    last_error: str | None = None
    started_at: datetime | None = None
    abort_reason: str | None = None
    # Signals that arrived in a phase where they mean nothing, with why they were ignored.
    ignored_signals: list[str] = Field(default_factory=list)
    # The phase in words where it alone could mislead, e.g. "rebuilt, cleanup pending".
    summary: str | None = None
    # Names this rebuild's backup; the same in every run of the workflow, resets included.
    rebuild_id: str | None = None
    # What the guest's cloud-init seed gives it (nothing secret), once the seed step ran.
    identity: str | None = None
    # The verify mode asked for ("default" when none), how the stop ended and what proved the boot.
    verify: str = "default"
    stopped_by: StopMethod | None = None
    verified_by: str | None = None
    # How the new root disk was made, once staged: overlay, copy, volume, ... (the back end's word).
    disk_mode: str | None = None
    # Who let a rebuild that asked for approval go on (the approve signal's requested_by).
    approved_by: str | None = None
    # Until when the rebuild waits for `approve` (then fails, nothing changed), or for `confirm` or
    # `revert` (then does the default); set while it waits.
    approval_deadline: datetime | None = None
    confirm_deadline: datetime | None = None
    # Once it has ended: how, and how long the instance was down (None: it was not running).
    outcome: Outcome | None = None
    downtime_seconds: float | None = None
    # A dry run's plan, once made.
    plan: RebuildPlan | None = None
    # Every phase entered so far, in order: a follower that polls now and then misses none, and the
    # fetch's entry is when the download began (speed and ETA come from it and the fetch's heartbeats).
    phases: list[PhaseEntered] = Field(default_factory=list)
    # While it stops: when the graceful shutdown's window ends and the instance is forced off.
    graceful_stop_deadline: datetime | None = None


class RebuildResult(Wire):
    instance: str
    host: str
    outcome: Outcome
    image_sha256: str | None = None
    image_format: str | None = None
    failed_step: Phase | None = None
    error: str | None = None
    # The ApplicationError type of the failure (for example "InstanceNotFound"), for scripts.
    error_type: str | None = None
    step_seconds: dict[str, float] = Field(default_factory=dict)
    # Stop returned "off" to start returned "running", measured on the host itself.
    downtime_seconds: float | None = None
    forced_stop: bool = False
    undone: list[str] = Field(default_factory=list)
    # Rebuilt, but the backup could not be removed or the image not recorded (for a person to look at).
    cleanup_error: str | None = None
    stopped_by: StopMethod | None = None
    verified_by: str | None = None
    disk_mode: str | None = None
    # The image as people name it: its URL, glance:ID or snapshot:ID (status shows it after the end).
    image_url: str | None = None
    # A dry run's plan (outcome planned): what the real run would change.
    plan: RebuildPlan | None = None
