"""What crosses Temporal for snapshots: the request, the record a snapshot leaves, the catalog's calls.

A snapshot is a point-in-time copy of an instance's root disk, kept in its host's image cache under
its SHA-256 with a record beside it; ``rebuild start --snapshot ID`` puts it back. Wire models check
only types (see ``workflows/wire.py``); the ``Strict*`` forms are what the CLI and the API accept.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Literal

from pydantic import ConfigDict, Field

from workflows.activity_models import CachedImage, ResolvedImage
from workflows.checks import HostName, InstanceName, RequestedBy
from workflows.wire import Wire

# A snapshot's ID: 32 lowercase hex digits (a UUID without dashes), the only name its record has.
SNAPSHOT_ID = re.compile(r"[0-9a-f]{32}")
SNAPSHOT_WORKFLOW = "SnapshotInstance"
SNAPSHOT_CATALOG_WORKFLOW = "SnapshotCatalog"
SNAPSHOT_PUBLISH_WORKFLOW = "PublishSnapshot"

# auto: freeze the guest's file systems when its agent answers, else a crash-consistent copy;
# required: fail (nothing changed) when the agent cannot freeze them; off: never freeze.
Quiesce = Literal["auto", "required", "off"]
# How consistent the copy is: the guest's file systems were frozen, the guest ran on (as after a power
# cut), or the instance was off.
Consistency = Literal["quiesced", "crash-consistent", "shut-off"]


def snapshot_workflow_id(host: str, instance: str) -> str:
    """One snapshot per instance at a time: the ID is the lock (a rebuild has its own)."""
    return f"snapshot:{host}:{instance}"


class SnapshotRequest(Wire):
    instance: str
    host: str
    label: str | None = None
    quiesce: Quiesce = "auto"
    # Keep this many snapshots of the instance on its host, the newest; None keeps every one.
    keep: int | None = None
    requested_by: str = "unknown"


class StrictSnapshotRequest(SnapshotRequest):
    model_config = ConfigDict(extra="forbid", frozen=True, title="SnapshotRequest")

    instance: InstanceName
    host: HostName
    label: str | None = Field(default=None, min_length=1, max_length=200, pattern=r"^[^\x00-\x1f\x7f]*$")
    keep: int | None = Field(default=None, ge=1, le=1000)
    requested_by: RequestedBy = "unknown"


class SnapshotRecord(Wire):
    """What a snapshot is, written atomically beside its image in the host's state directory."""

    snapshot_id: str
    instance: str
    instance_uuid: str
    host: str
    taken_at: datetime
    label: str | None = None
    sha256: str
    format: str
    size: int
    virtual_size: int
    consistency: Consistency
    # How long the guest's file systems were frozen; None where they were not.
    frozen_ms: float | None = None
    root_disk_target: str
    # The image the instance had been rebuilt from, where a rebuild recorded one.
    image_sha256: str | None = None


class TakeSnapshotInput(Wire):
    snapshot_id: str
    instance: str
    host: str
    label: str | None = None
    quiesce: Quiesce = "auto"


class DiscardSnapshotInput(Wire):
    """A snapshot that did not finish: its backup job aborted, its partial file gone, the guest thawed."""

    snapshot_id: str
    instance: str


class ResolveSnapshotInput(Wire):
    snapshot_id: str


class PruneSnapshotsInput(Wire):
    instance: str
    keep: int


class SnapshotCatalogRequest(Wire):
    """One call on a host's snapshots: list them (of one instance, or all), or delete some by ID."""

    host: str
    action: Literal["list", "delete"]
    instance: str | None = None
    snapshot_ids: tuple[str, ...] = ()


class SnapshotCatalogResult(Wire):
    snapshots: tuple[SnapshotRecord, ...] = ()
    deleted: tuple[str, ...] = ()


class SnapshotImage(Wire):
    """A snapshot as a rebuild's image: already in the host's cache, so fetch is skipped."""

    record: SnapshotRecord
    source: ResolvedImage
    cached: CachedImage


class PublishSnapshotInput(Wire):
    snapshot_id: str
    # The Glance image's name; None: "snapshot of INSTANCE (ID)".
    name: str | None = None


class PublishRequest(Wire):
    host: str
    snapshot_id: str
    name: str | None = None


class StrictPublishRequest(PublishRequest):
    model_config = ConfigDict(extra="forbid", frozen=True, title="PublishRequest")

    host: HostName
    snapshot_id: str = Field(pattern=SNAPSHOT_ID.pattern)
    name: str | None = Field(default=None, min_length=1, max_length=255, pattern=r"^[^\x00-\x1f\x7f]*$")


class PublishedSnapshot(Wire):
    """A snapshot as an image of the worker's Glance: any host can rebuild from it by this ID."""

    snapshot_id: str
    glance_url: str
    glance_image_id: str
    sha512: str
