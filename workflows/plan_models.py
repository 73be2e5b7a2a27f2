"""What a dry run reports: the rebuild the real run would make, found without touching the instance.

A dry run (``RebuildRequest.dry_run``) inspects, resolves, fetches, checks and pre-flights (when asked),
asks the root disk's back end how it would make the new disk, and ends with this plan in its result and
its status, as Terraform's plan and Ansible's check mode do. Nothing secret is in it: the identity's
changes are named, user data by its digest, a password only as set or removed.
"""

from __future__ import annotations

from pydantic import Field

from workflows.activity_models import PlannedRootDisk
from workflows.wire import Wire


class PlannedImage(Wire):
    # As people name it: its URL, glance:ID or snapshot:ID.
    label: str
    sha256: str
    format: str
    virtual_size: int
    # Whether the host's cache had it before this dry run (else the dry run downloaded it, and the real
    # run will find it cached).
    cached_before: bool
    downloaded_bytes: int = 0


class PlannedDowntime(Wire):
    """How long the instance would be down, as far as can be said honestly before it happens."""

    # The graceful part of the stop is bounded by this (then the instance is forced off); None: the
    # instance is off already and no stop is needed.
    graceful_stop_bound_seconds: float | None
    # Whether the real run would start the instance again after the swap.
    starts_after: bool
    # In words: what the downtime is made of, and what is not known.
    estimate: str
    # This host's last rebuilds, off to running (the swap and the start, not the stop): filled by the
    # client that shows the plan (CLI, API), as the workflow cannot read other rebuilds. None: none.
    measured_median_seconds: float | None = None
    measured_rebuilds: int = 0


class RebuildPlan(Wire):
    instance: str
    host: str
    instance_uuid: str
    running: bool
    root_disk: PlannedRootDisk
    image: PlannedImage
    # What the cloud-init seed would change, one item a line; empty: no seed is written.
    identity_changes: list[str] = Field(default_factory=list)
    # What was checked, and how it came out (pre-flight's boot among them when it ran).
    checks: list[str] = Field(default_factory=list)
    downtime: PlannedDowntime
    # What the real run would do besides (wait for approval, keep a confirm window).
    notes: list[str] = Field(default_factory=list)
