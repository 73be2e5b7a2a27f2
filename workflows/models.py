"""Everything that crosses the Temporal boundary: workflow and activity inputs and outputs.

The workflow owns these models. Each workflow and activity takes one model and returns one, so a field
can be added later without breaking a rebuild that is already running.

Two rules keep mixed worker versions and replays working (see the README's versioning policy):
- what crosses Temporal ignores fields it does not know, so a newer client or worker never stops an
  older one's workflow task;
- what crosses Temporal is not validated beyond its types: a validator tightened later would fail the
  replay of a rebuild that started under the old one. Checks belong at the edges, where a person or a
  service asks for something: the ``Strict*`` models below, used by the CLI and the HTTP API.
"""

from __future__ import annotations

import re
from datetime import datetime
from enum import StrEnum
from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from workflows.identity import IdentityChange, SeedFormat

WORKFLOW_TASK_QUEUE = "rebuild"
# The workflow and its handlers by name: clients refer to them without importing the workflow module
# (and with it libvirt and every activity).
WORKFLOW_NAME = "RebuildInstance"
STATUS_QUERY = "status"
APPROVE_SIGNAL = "approve"
CONFIRM_SIGNAL = "confirm"
REVERT_SIGNAL = "revert"
ABORT_SIGNAL = "abort"
ABORT_UPDATE = "abort_rebuild"
SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
SHA512_HEX = re.compile(r"^[0-9a-f]{128}$")
GLANCE_IMAGE_ID = re.compile(r"^[0-9a-fA-F-]{32,36}$")
DiskFormat = Literal["raw", "qcow2"]
# libvirt accepts almost anything as a domain name; we refuse what cannot be part of a workflow ID
# or a file name without quoting.
INSTANCE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+:-]{0,199}$")
HOST_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
# A disk's target device as libvirt names it: vda, sdb, hdc, xvda, ...
DISK_TARGET = re.compile(r"^[a-z][a-z0-9]{1,31}$")
# How a stop ended: the guest powered off on the ACPI button or on the guest agent's request, or it was
# forced off after the stop timeout. None: it was off already.
StopMethod = Literal["acpi", "agent", "forced"]
# With no --verify, a domain without a guest agent channel must still run this long after start.
DEFAULT_RUNNING_SECONDS = 5.0


def host_task_queue(host: str) -> str:
    """The queue polled only by the worker on ``host``: host activities must run where the disk is."""
    return f"rebuild-host-{host}"


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


# Who asked for a rebuild or a decision: shown in the Web UI and kept in every history, so bounded at
# the edges (CLI, API); the wire models stay lenient, so running workflows always replay.
MAX_REQUESTED_BY = 200


def check_requested_by(value: str) -> str:
    if not 1 <= len(value) <= MAX_REQUESTED_BY:
        raise ValueError(f"requested_by must have 1 to {MAX_REQUESTED_BY} characters, not {len(value)}")
    return value


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
    PREPARE = "prepare"
    SEED = "seed"
    START = "start"
    VERIFY = "verify"
    CONFIRM_WINDOW = "confirm-window"
    CLEANUP = "cleanup"
    ROLLBACK = "rollback"
    DONE = "done"
    ROLLED_BACK = "rolled-back"
    FAILED = "failed"


class Outcome(StrEnum):
    REBUILT = "rebuilt"
    ROLLED_BACK = "rolled-back"
    UNCHANGED = "unchanged"
    ROLLBACK_FAILED = "rollback-failed"


class _Model(BaseModel):
    """A model that crosses Temporal: fields it does not know (from a newer version) are ignored."""

    model_config = ConfigDict(extra="ignore", frozen=True)


class VerifySpec(_Model):
    """How the new image proves it booted, parsed from ``agent``, ``console:REGEX`` or ``running:SECONDS``.

    - agent: the QEMU guest agent answers ``guest-ping`` and ``guest-get-osinfo`` within the boot timeout.
    - console: the serial console (a file log, else libvirt's console stream) prints a match of the regex.
    - running: the domain is still running that many seconds after start.
    """

    kind: Literal["agent", "console", "running"]
    pattern: str | None = None
    seconds: float | None = None

    @classmethod
    def parse(cls, value: str) -> VerifySpec:
        kind, sep, argument = value.partition(":")
        if kind == "agent" and not sep:
            return cls(kind="agent")
        if kind == "console" and argument:
            try:
                re.compile(argument)
            except re.error as err:
                raise ValueError(f"console:REGEX has a bad regular expression: {err}") from None
            return cls(kind="console", pattern=argument)
        if kind == "running" and argument:
            try:
                seconds = float(argument)
            except ValueError:
                raise ValueError(f"running:SECONDS needs a number, not {argument!r}") from None
            if not 0 <= seconds <= 3600:
                raise ValueError("running:SECONDS must be between 0 and 3600")
            return cls(kind="running", seconds=seconds)
        raise ValueError(f"verify must be agent, console:REGEX or running:SECONDS, not {value!r}")

    def label(self) -> str:
        if self.kind == "console":
            return f"console:{self.pattern}"
        if self.kind == "running":
            return f"running:{self.seconds:g}"
        return self.kind


class RebuildRequest(_Model):
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
    # The root disk's target device (vda, sda, ...) where the boot order leaves it ambiguous; None:
    # the disk that comes first in the domain's boot order.
    root_disk: str | None = None
    # Drop the instance's snapshots (their metadata once the rebuild is confirmed; their data lives in
    # the old disk, kept until cleanup so a rollback brings them back). Without it they are refused.
    discard_snapshots: bool = False

    @property
    def image_label(self) -> str:
        """How the image is shown to people: its URL or its Glance ID."""
        return self.image_url or f"glance:{self.glance_image_id}"


class StrictRebuildRequest(RebuildRequest):
    """A rebuild request as the CLI and the API accept it: names, URLs, digests and limits checked."""

    model_config = ConfigDict(extra="forbid", frozen=True, title="RebuildRequest")

    stop_timeout_seconds: float = Field(default=60.0, ge=0, le=3600)
    boot_marker: str | None = Field(default=None, min_length=1, max_length=200)
    boot_timeout_seconds: float = Field(default=120.0, gt=0, le=3600)
    verify: str | None = Field(default=None, max_length=300)
    max_virtual_size_bytes: int = Field(default=1 << 40, gt=0)
    approval_timeout_seconds: float = Field(default=3600.0, gt=0, le=7 * 86400)
    confirm_within_seconds: float | None = Field(default=None, gt=0, le=30 * 86400)
    root_disk: str | None = Field(default=None, pattern=DISK_TARGET.pattern)

    @field_validator("instance")
    @classmethod
    def _instance_name(cls, value: str) -> str:
        if not INSTANCE_NAME.match(value):
            raise ValueError(f"not a usable instance name: {value!r}")
        return value

    @field_validator("host")
    @classmethod
    def _host_name(cls, value: str) -> str:
        if not HOST_NAME.match(value):
            raise ValueError(f"not a usable host name: {value!r}")
        return value

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
        if value is not None and not GLANCE_IMAGE_ID.match(value):
            raise ValueError(f"not a Glance image ID: {value!r}")
        return value

    @field_validator("sha256")
    @classmethod
    def _sha256(cls, value: str | None) -> str | None:
        if value is None:
            return None
        lowered = value.lower()
        if not SHA256_HEX.match(lowered):
            raise ValueError("sha256 must be 64 hexadecimal characters")
        return lowered

    @field_validator("sha512")
    @classmethod
    def _sha512(cls, value: str | None) -> str | None:
        if value is None:
            return None
        lowered = value.lower()
        if not SHA512_HEX.match(lowered):
            raise ValueError("sha512 must be 128 hexadecimal characters")
        return lowered

    @model_validator(mode="after")
    def _one_image_source(self) -> StrictRebuildRequest:
        glance = self.glance_image_id is not None or self.glance_url is not None
        if glance and not (self.glance_image_id and self.glance_url):
            raise ValueError("a Glance image needs both the image ID and the Glance URL")
        if glance == (self.image_url is not None):
            raise ValueError("name the image by exactly one of: an image URL, or a Glance image ID")
        return self

    @model_validator(mode="after")
    def _one_boot_check(self) -> StrictRebuildRequest:
        if self.boot_marker is not None and self.verify is not None:
            raise ValueError("give either a boot marker or a verify mode, not both")
        return self


class InspectInstanceInput(_Model):
    instance: str
    # The operator's choice of root disk (a target device); None: the first disk in the boot order.
    root_disk: str | None = None
    discard_snapshots: bool = False


class InstanceInfo(_Model):
    """What the rebuild needs to know about the instance, read from its libvirt definition."""

    name: str
    uuid: str
    was_running: bool
    root_disk_path: str
    root_disk_format: str
    root_disk_target: str
    current_image_sha256: str | None = None
    # The instance got its identity from an earlier rebuild: every rebuild renews its seed.
    has_identity: bool = False
    # This host's worker boots new images in a sandbox first unless a request says otherwise.
    preflight_by_default: bool = False


class FetchImageInput(_Model):
    url: str
    sha256: str | None = None
    sha512: str | None = None
    # A server that sends more than this is refused, so it cannot fill the host's disk.
    max_bytes: int


class FetchProgress(_Model):
    """Heartbeat details of the fetch activity: a hint where to resume, and progress to show."""

    offset: int
    total: int | None = None


class CachedImage(_Model):
    sha256: str
    size: int
    downloaded_bytes: int
    cache_hit: bool


class CheckImageInput(_Model):
    sha256: str
    max_virtual_size_bytes: int
    declared_format: DiskFormat | None = None


class ResolveGlanceImageInput(_Model):
    glance_url: str
    image_id: str
    # The request's limit: a record whose min_disk asks for more is refused.
    max_virtual_size_bytes: int | None = None


class ResolvedImage(_Model):
    """A Glance image record, reduced to what a rebuild needs."""

    url: str
    sha256: str | None = None
    sha512: str | None = None
    # None: not declared; the image's header alone decides.
    disk_format: DiskFormat | None = None
    size: int | None = None
    min_disk_bytes: int = 0


class CheckedImage(_Model):
    sha256: str
    format: str
    virtual_size: int


class StopInstanceInput(_Model):
    instance: str
    timeout_seconds: float


class StopResult(_Model):
    was_running: bool
    forced: bool
    stopped_at: datetime
    # Where the serial log ends while the instance is off: the boot check reads only what follows.
    console_offset: int = 0
    stopped_by: StopMethod | None = None


class PrepareRootDiskInput(_Model):
    instance: str
    image_sha256: str
    image_format: str
    image_virtual_size: int
    # A retry after the definition changed must still know what the backup is.
    original_format: str
    # The image's own minimum disk size (Glance min_disk): the new disk is grown to at least this.
    min_virtual_size: int = 0
    # The backup file name is derived from this, so a retried prepare finds what the first began.
    rebuild_id: str
    # The request's limit on the new disk's size, min_virtual_size included.
    max_virtual_size: int | None = None
    # The instance's snapshots may go with the old disk (recorded here, forgotten at cleanup).
    discard_snapshots: bool = False
    # The root disk inspect found (its target device): every step works on that disk. None in
    # rebuilds started before it was passed: the step finds it again by the same rule.
    root_disk_target: str | None = None


class StageRootDiskInput(_Model):
    """Write the new root disk while the instance still runs, beside the old one, never in its place."""

    instance: str
    rebuild_id: str
    image_sha256: str
    image_format: str
    image_virtual_size: int
    min_virtual_size: int = 0
    max_virtual_size: int | None = None
    root_disk_target: str | None = None


class StagedRootDisk(_Model):
    # Where the new disk waits for the swap (a file beside the old one, or a new volume).
    staged_at: str
    virtual_size: int
    # How the new disk was made: overlay (qcow2 on the cached image), copy, volume.
    mode: str = "overlay"


class DiscardStagedRootDiskInput(_Model):
    """Stage's undo: the new disk goes if it never took the old one's place."""

    instance: str
    rebuild_id: str
    root_disk_target: str | None = None


class PrepareSeedInput(_Model):
    instance: str
    rebuild_id: str
    change: IdentityChange | None = None
    # The root disk inspect found (its target device): every step works on that disk. None in
    # rebuilds started before it was passed: the step finds it again by the same rule.
    root_disk_target: str | None = None


class SeedResult(_Model):
    seed_path: str
    instance_id: str
    seed_format: SeedFormat
    # What the guest gets, with nothing secret in it: for status and the Web UI.
    summary: str


class RestoreSeedInput(_Model):
    instance: str
    rebuild_id: str
    # The root disk inspect found (its target device): every step works on that disk. None in
    # rebuilds started before it was passed: the step finds it again by the same rule.
    root_disk_target: str | None = None


class RemoveSeedBackupInput(_Model):
    instance: str
    rebuild_id: str
    # The root disk inspect found (its target device): every step works on that disk. None in
    # rebuilds started before it was passed: the step finds it again by the same rule.
    root_disk_target: str | None = None


class PreparedRootDisk(_Model):
    disk_path: str
    backup_path: str
    virtual_size: int


class RestoreRootDiskInput(_Model):
    instance: str
    rebuild_id: str
    original_format: str
    # The image the new disk is an overlay on: tells a new disk from an old one made by an earlier rebuild.
    image_sha256: str | None = None
    # The root disk inspect found (its target device): every step works on that disk. None in
    # rebuilds started before it was passed: the step finds it again by the same rule.
    root_disk_target: str | None = None


class StartInstanceInput(_Model):
    instance: str


class StartResult(_Model):
    started_at: datetime
    already_running: bool = False


class VerifyInstanceInput(_Model):
    instance: str
    boot_marker: str | None = None
    boot_timeout_seconds: float = 120.0
    console_offset: int = 0
    verify: str | None = None
    # With both: the running domain's root disk must be an overlay on this image, as QEMU opened it.
    root_disk_target: str | None = None
    image_sha256: str | None = None


class VerifyResult(_Model):
    """What proved the boot: the mode used (after the default was chosen) and what it saw."""

    verified_by: str
    detail: str = ""
    seconds: float = 0.0


class PreflightInput(_Model):
    instance: str
    rebuild_id: str
    image_sha256: str
    image_format: str
    image_virtual_size: int
    min_virtual_size: int = 0
    verify: str | None = None
    boot_marker: str | None = None
    boot_timeout_seconds: float = 120.0
    # The request's identity change: the sandbox gets the seed the rebuild would attach.
    change: IdentityChange | None = None
    # The root disk inspect found (its target device): every step works on that disk. None in
    # rebuilds started before it was passed: the step finds it again by the same rule.
    root_disk_target: str | None = None


class PreflightResult(_Model):
    verified_by: str
    detail: str = ""
    seconds: float = 0.0
    # How long it waited for one of the host's sandbox slots.
    waited_seconds: float = 0.0


class RemoveBackupInput(_Model):
    instance: str
    rebuild_id: str
    # The root disk inspect found (its target device): every step works on that disk. None in
    # rebuilds started before it was passed: the step finds it again by the same rule.
    root_disk_target: str | None = None
    # The instance's snapshots go with the old disk (their metadata is removed here).
    discard_snapshots: bool = False


class RecordImageInput(_Model):
    instance: str
    image_sha256: str
    image_url: str
    rebuilt_at: datetime


class AbortRequest(_Model):
    reason: str
    requested_by: str = "unknown"


class StrictAbortRequest(AbortRequest):
    model_config = ConfigDict(extra="forbid", frozen=True, title="AbortRequest")

    reason: str = Field(min_length=1, max_length=500)


class Decision(_Model):
    """An operator's or a service's word on a waiting rebuild: approve, confirm or revert."""

    reason: str = ""
    requested_by: str = "unknown"


class StrictDecision(Decision):
    model_config = ConfigDict(extra="forbid", frozen=True, title="Decision")

    reason: str = Field(default="", max_length=500)


class AbortAnswer(_Model):
    accepted: bool
    phase: Phase
    message: str


class RebuildStatus(_Model):
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


class RebuildResult(_Model):
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
