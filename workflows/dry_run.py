"""A dry run's plan from what its steps found: pure functions, safe in the workflow sandbox.

The plan says what the real run would change and nothing it cannot know: the downtime is given as the
bound the request sets on the stop, never as a figure made up for the swap and the boot.
"""

from __future__ import annotations

import hashlib

from workflows import activity_models as io
from workflows.identity import IdentityChange
from workflows.image_steps import NewImage
from workflows.models import RebuildRequest
from workflows.plan_models import PlannedDowntime, PlannedImage, RebuildPlan


def rebuild_plan(
    request: RebuildRequest,
    instance: io.InstanceInfo,
    image: NewImage,
    disk: io.PlannedRootDisk,
    preflight: io.PreflightResult | None,
) -> RebuildPlan:
    """The plan of ``request`` on ``instance``: every step before the stop has run and passed."""
    return RebuildPlan(
        instance=request.instance,
        host=request.host,
        instance_uuid=instance.uuid,
        running=instance.was_running,
        # As data: inside the workflow sandbox the activity's result may be another copy of its class.
        root_disk=disk.model_dump(),
        image=PlannedImage(
            label=request.image_label,
            sha256=image.checked.sha256,
            format=image.checked.format,
            virtual_size=image.checked.virtual_size,
            cached_before=image.cached.cache_hit,
            downloaded_bytes=image.cached.downloaded_bytes,
        ),
        identity_changes=identity_changes(request.identity, instance.has_identity),
        checks=_checks(request, instance, image, disk, preflight),
        downtime=downtime(request, instance),
        notes=_notes(request),
    )


def identity_changes(change: IdentityChange | None, has_identity: bool) -> list[str]:
    """What the seed would change, by Nova's rules (None keeps, empty removes), with nothing secret."""
    if change is None:
        return ["seed renewed with the identity the instance has (no change)"] if has_identity else []
    changes = []
    for what, value in (("hostname", change.hostname), ("name", change.name)):
        if value is not None:
            changes.append(f"{what}: {value}" if value else f"{what}: removed")
    if change.description is not None:
        changes.append("description: replaced" if change.description else "description: removed")
    if change.ssh_keys is not None:
        changes.append(f"SSH keys: {len(change.ssh_keys)} key(s)" if change.ssh_keys else "SSH keys: removed")
    if change.user_data is not None:
        data = change.user_data.encode()
        digest = hashlib.sha256(data).hexdigest()
        changes.append(f"user data: {len(data)} bytes, sha256 {digest}" if data else "user data: removed")
    if change.metadata is not None:
        changes.append(
            f"metadata: {len(change.metadata)} item(s)" if change.metadata else "metadata: removed"
        )
    if change.admin_password_hash is not None:
        changes.append("admin password: set" if change.admin_password_hash else "admin password: removed")
    if change.seed_format is not None:
        changes.append(f"seed format: {change.seed_format}")
    return changes or ["seed renewed (no field changes)"]


def downtime(request: RebuildRequest, instance: io.InstanceInfo) -> PlannedDowntime:
    """The stop's bound, and what follows it; a figure for the swap and the boot only once measured."""
    starts = instance.was_running if request.start_after is None else request.start_after
    if not instance.was_running:
        estimate = (
            "none: the instance is off; it is started on the new disk after the swap"
            if starts
            else "none: the instance is off and stays off"
        )
        return PlannedDowntime(graceful_stop_bound_seconds=None, starts_after=starts, estimate=estimate)
    bound = request.stop_timeout_seconds
    if not starts:
        estimate = f"the instance stops (graceful up to {bound:g} s, then forced) and stays off"
    else:
        estimate = (
            f"the graceful stop (up to {bound:g} s, then forced off), the swap and the start; "
            "the guest's shutdown and boot times are unknown until measured"
        )
    return PlannedDowntime(graceful_stop_bound_seconds=bound, starts_after=starts, estimate=estimate)


def _checks(
    request: RebuildRequest,
    instance: io.InstanceInfo,
    image: NewImage,
    disk: io.PlannedRootDisk,
    preflight: io.PreflightResult | None,
) -> list[str]:
    digests = [
        name for name, value in (("sha256", image.source.sha256), ("sha512", image.source.sha512)) if value
    ]
    checks = [
        f"inspect: {instance.name} can be rebuilt (root disk {disk.target}, {disk.kind}, {disk.format})",
        "fetch: digest " + (" and ".join(digests) + " matched" if digests else "computed (none was given)"),
        f"check: a {image.checked.format} image of {image.checked.virtual_size} bytes, no backing or "
        f"external file, within the limit of {request.max_virtual_size_bytes} bytes",
        f"plan: the {disk.kind} back end would make the new disk: {disk.mode}, {disk.new_virtual_size} bytes",
    ]
    if preflight is not None:
        detail = f": {preflight.detail}" if preflight.detail else ""
        checks.append(f"pre-flight: booted in a sandbox, verified by {preflight.verified_by}{detail}")
    else:
        checks.append("pre-flight: not run (pass --preflight to boot the image in a sandbox first)")
    return checks


def _notes(request: RebuildRequest) -> list[str]:
    notes = []
    if request.require_approval:
        notes.append(
            f"a real run waits up to {request.approval_timeout_seconds:g} s for approve before the stop"
        )
    if request.confirm_within_seconds is not None:
        default = "revert" if request.revert_by_default else "confirm"
        notes.append(
            f"a real run keeps the old disk {request.confirm_within_seconds:g} s for confirm or revert, "
            f"then {default}s"
        )
    if request.discard_snapshots:
        notes.append("a real run drops the instance's snapshots once the rebuild is kept")
    return notes
