"""What the workflows and the host activities hand each other: one model in, one model out per activity.

The workflows own these models (``workflows/contract.py`` names the activities that take them); the
activities under ``activities/`` import them. Wire models: see ``workflows/wire.py`` for their rules.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal, Protocol

from workflows.identity import IdentityChange, SeedFormat
from workflows.wire import Wire

__all__ = [
    "DEFAULT_RUNNING_SECONDS",
    "DISK_MODES",
    "MAX_CONSOLE_PATTERN",
    "CachedImage",
    "CheckImageInput",
    "CheckedImage",
    "CleanUpInput",
    "ConsoleRegex",
    "DiscardStagedRootDiskInput",
    "DiskFormat",
    "DiskMode",
    "FetchImageInput",
    "FetchProgress",
    "HostInventory",
    "InspectInstanceInput",
    "InstanceInfo",
    "InventoryEntry",
    "ListInstancesInput",
    "NewRootDisk",
    "OnRootDisk",
    "PlanRootDiskInput",
    "PlannedRootDisk",
    "PreflightInput",
    "PreflightResult",
    "PrepareRootDiskInput",
    "PrepareSeedInput",
    "PreparedRootDisk",
    "RecordImageInput",
    "RemoveBackupInput",
    "RemoveSeedBackupInput",
    "ResolveGlanceImageInput",
    "ResolvedImage",
    "RestoreRootDiskInput",
    "RestoreSeedInput",
    "SeedResult",
    "StageRootDiskInput",
    "StagedRootDisk",
    "StartInstanceInput",
    "StartResult",
    "StopInstanceInput",
    "StopMethod",
    "StopResult",
    "SwapRootDiskInput",
    "SwapRootDiskResult",
    "VerifyInstanceInput",
    "VerifyResult",
    "VerifySpec",
    "console_regex",
]  # fmt: skip


DiskFormat = Literal["raw", "qcow2"]
# How a file root disk's new disk is made (see RebuildRequest.disk_mode).
DiskMode = Literal["overlay", "copy"]
DISK_MODES: tuple[str, ...] = ("overlay", "copy")

# How a stop ended: the guest powered off on the ACPI button or on the guest agent's request, or it was
# forced off after the stop timeout. None: it was off already.
StopMethod = Literal["acpi", "agent", "forced"]
# With no --verify, a domain without a guest agent channel must still run this long after start.
DEFAULT_RUNNING_SECONDS = 5.0
# The longest console:REGEX pattern: RE2 matches in time linear in the text, times the pattern's size.
MAX_CONSOLE_PATTERN = 300


class ConsoleRegex(Protocol):
    """A compiled console pattern (RE2's): ``search`` returns a match with ``group(0)``, or None."""

    def search(self, text: bytes) -> Any: ...


def console_regex(pattern: str) -> ConsoleRegex:
    """``pattern`` compiled by RE2, a linear-time engine: no pattern can make a search backtrack for
    ever (Python's ``re`` takes exponential time on ``(a+)+b`` against a line of ``a``s, holding the GIL).
    RE2 has no backreferences, lookarounds or ``\\Z``; a pattern that needs them is refused here, at the
    edge, with RE2's reason. RE2 is imported here, never where a workflow runs."""
    import re2  # kept out of the workflow sandbox's imports

    if len(pattern) > MAX_CONSOLE_PATTERN:
        raise ValueError(f"console:REGEX may have at most {MAX_CONSOLE_PATTERN} characters")
    options = re2.Options()
    options.log_errors = False
    try:
        compiled: ConsoleRegex = re2.compile(pattern.encode(), options)
    except re2.error as err:
        reason = err.args[0].decode(errors="replace") if err.args else "bad pattern"
        raise ValueError(
            f"console:REGEX must be a regular expression RE2 accepts (no backreferences or "
            f"lookarounds): {reason}"
        ) from None
    return compiled


class VerifySpec(Wire):
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
            console_regex(argument)
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


class InspectInstanceInput(Wire):
    instance: str
    # The operator's choice of root disk (a target device); None: the first disk in the boot order.
    root_disk: str | None = None
    discard_snapshots: bool = False


class InstanceInfo(Wire):
    """What the rebuild needs to know about the instance, read from its libvirt definition."""

    name: str
    uuid: str
    was_running: bool
    root_disk_path: str
    root_disk_format: str
    root_disk_target: str
    current_image_sha256: str | None = None
    # The image URL the last rebuild recorded (``snapshot:ID`` for a snapshot): a request naming no
    # image is rebuilt from it ("reinstall", as `openstack server rebuild` without an image).
    current_image_url: str | None = None
    # The instance got its identity from an earlier rebuild: every rebuild renews its seed.
    has_identity: bool = False
    # This host's worker boots new images in a sandbox first unless a request says otherwise.
    preflight_by_default: bool = False
    # This host's worker has swap_root_disk (stop, prepare and start in one activity): a workflow asks
    # for it only where the host says so, since a worker from before it would never pick it up.
    swaps_in_one_step: bool = False
    # The same for clean_up_rebuild (remove_backup and record_image in one activity).
    cleans_up_in_one_step: bool = False


class FetchImageInput(Wire):
    url: str
    sha256: str | None = None
    sha512: str | None = None
    # A server that sends more than this is refused, so it cannot fill the host's disk.
    max_bytes: int


class FetchProgress(Wire):
    """Heartbeat details of the fetch activity: a hint where to resume, and progress to show."""

    offset: int
    total: int | None = None


class CachedImage(Wire):
    sha256: str
    size: int
    downloaded_bytes: int
    cache_hit: bool


class CheckImageInput(Wire):
    sha256: str
    max_virtual_size_bytes: int
    declared_format: DiskFormat | None = None


class ResolveGlanceImageInput(Wire):
    glance_url: str
    image_id: str
    # The request's limit: a record whose min_disk asks for more is refused.
    max_virtual_size_bytes: int | None = None


class ResolvedImage(Wire):
    """A Glance image record, reduced to what a rebuild needs."""

    url: str
    sha256: str | None = None
    sha512: str | None = None
    # None: not declared; the image's header alone decides.
    disk_format: DiskFormat | None = None
    size: int | None = None
    min_disk_bytes: int = 0


class CheckedImage(Wire):
    sha256: str
    format: str
    virtual_size: int


class StopInstanceInput(Wire):
    instance: str
    timeout_seconds: float


class StopResult(Wire):
    was_running: bool
    forced: bool
    stopped_at: datetime
    # Where the serial log ends while the instance is off: the boot check reads only what follows.
    console_offset: int = 0
    stopped_by: StopMethod | None = None


class OnRootDisk(Wire):
    """What every step on the root disk takes: the instance, and the rebuild that is changing its disk."""

    instance: str
    # Backups and seeds are named by it, so a retried step finds what the first attempt began, after a
    # reset too (it is the first run's ID).
    rebuild_id: str
    # The root disk inspect found (its target device): every step works on that disk. None in
    # rebuilds started before it was passed: the step finds it again by the same rule.
    root_disk_target: str | None = None


class NewRootDisk(OnRootDisk):
    """What stage and prepare make the new root disk from: the checked image, and the size limits."""

    image_sha256: str
    image_format: str
    image_virtual_size: int
    # The image's own minimum disk size (Glance min_disk): the new disk is grown to at least this.
    min_virtual_size: int = 0
    # The request's limit on the new disk's size, min_virtual_size included.
    max_virtual_size: int | None = None


class PrepareRootDiskInput(NewRootDisk):
    # A retry after the definition changed must still know what the backup is.
    original_format: str
    # The instance's snapshots may go with the old disk (recorded here, forgotten at cleanup).
    discard_snapshots: bool = False


class StageRootDiskInput(NewRootDisk):
    """Write the new root disk while the instance still runs, beside the old one, never in its place."""

    # overlay or copy for a file root disk; None: the host worker's default.
    disk_mode: str | None = None


class StagedRootDisk(Wire):
    # Where the new disk waits for the swap (a file beside the old one, or a new volume).
    staged_at: str
    virtual_size: int
    # How the new disk was made: overlay (qcow2 on the cached image), copy, volume.
    mode: str = "overlay"


class PlanRootDiskInput(NewRootDisk):
    """What stage would be asked, asked of the back end without writing anything (a dry run)."""

    disk_mode: str | None = None
    discard_snapshots: bool = False


class PlannedRootDisk(Wire):
    """The root disk as it is, and how its back end would make the new one: nothing was written."""

    target: str
    # The definition's path (a file), or pool/volume, or the block device.
    path: str
    # The <disk type>: file, volume, block.
    kind: str
    format: str
    virtual_size: int
    new_virtual_size: int
    # In stage's words: overlay, copy (...), volume: ... (see StagedRootDisk.mode).
    mode: str


class DiscardStagedRootDiskInput(OnRootDisk):
    """Stage's undo: the new disk goes if it never took the old one's place."""


class PrepareSeedInput(OnRootDisk):
    change: IdentityChange | None = None


class SeedResult(Wire):
    seed_path: str
    instance_id: str
    seed_format: SeedFormat
    # What the guest gets, with nothing secret in it: for status and the Web UI.
    summary: str


class RestoreSeedInput(OnRootDisk):
    """Put the seed the rebuild replaced back (its undo)."""


class RemoveSeedBackupInput(OnRootDisk):
    """The rebuild is kept: the old seed file goes."""


class PreparedRootDisk(Wire):
    disk_path: str
    backup_path: str
    virtual_size: int


class RestoreRootDiskInput(OnRootDisk):
    original_format: str
    # The image the new disk is an overlay on: tells a new disk from an old one made by an earlier rebuild.
    image_sha256: str | None = None


class StartInstanceInput(Wire):
    instance: str
    # A rebuild's own start is recorded on the host (the domain, this boot, where its console stood):
    # verify checks only a boot its rebuild started. None: a rollback's restart, recorded nowhere.
    rebuild_id: str | None = None


class StartResult(Wire):
    started_at: datetime
    already_running: bool = False


class SwapRootDiskInput(Wire):
    """Stop, prepare and start as one activity: no workflow round trip inside the downtime."""

    stop: StopInstanceInput
    prepare: PrepareRootDiskInput
    start: StartInstanceInput


class SwapRootDiskResult(Wire):
    stopped: StopResult
    prepared: PreparedRootDisk
    started: StartResult
    # Each part's own seconds, for the rebuild's per-step timings.
    prepare_seconds: float = 0.0
    start_seconds: float = 0.0


class VerifyInstanceInput(Wire):
    instance: str
    boot_marker: str | None = None
    boot_timeout_seconds: float = 120.0
    # Where this boot's console output begins. verify_instance takes it from its start record instead:
    # only the sandbox's check (pre-flight) uses it as given.
    console_offset: int = 0
    verify: str | None = None
    # With these: the running domain's root disk must be the new one, as QEMU opened it (its back end
    # says how it knows; rebuild_id finds what stage wrote). verify_instance needs rebuild_id: it checks
    # only the boot that this rebuild's start_instance recorded.
    root_disk_target: str | None = None
    image_sha256: str | None = None
    rebuild_id: str | None = None


class VerifyResult(Wire):
    """What proved the boot: the mode used (after the default was chosen) and what it saw."""

    verified_by: str
    detail: str = ""
    seconds: float = 0.0


class PreflightInput(OnRootDisk):
    image_sha256: str
    image_format: str
    image_virtual_size: int
    min_virtual_size: int = 0
    verify: str | None = None
    boot_marker: str | None = None
    boot_timeout_seconds: float = 120.0
    # The request's identity change: the sandbox gets the seed the rebuild would attach.
    change: IdentityChange | None = None


class PreflightResult(Wire):
    verified_by: str
    detail: str = ""
    seconds: float = 0.0
    # How long it waited for one of the host's sandbox slots.
    waited_seconds: float = 0.0


class RemoveBackupInput(OnRootDisk):
    # The instance's snapshots go with the old disk (their metadata is removed here).
    discard_snapshots: bool = False


class RecordImageInput(Wire):
    instance: str
    image_sha256: str
    image_url: str
    rebuilt_at: datetime


class CleanUpInput(Wire):
    """The backup's removal and the image's record in one activity: one round trip, not two."""

    remove: RemoveBackupInput
    record: RecordImageInput


class ListInstancesInput(Wire):
    # fnmatch pattern; None lists every domain.
    name_pattern: str | None = None


class InventoryEntry(Wire):
    instance: str
    running: bool
    # From the domain's <metadata>, written by the last successful rebuild.
    image_sha256: str | None = None
    image_url: str | None = None
    # virsh's word for the domain's state: running, paused, shut off, crashed, ...
    state: str | None = None
    # The root disk's <disk type> (file, volume, block, network, ...); None when no root disk is
    # certain. ``refusal`` says why a rebuild would refuse the instance (None: it would not).
    root_disk: str | None = None
    refusal: str | None = None


class HostInventory(Wire):
    instances: list[InventoryEntry]
