"""Resolve, fetch, check: the image steps a rebuild runs, and a fleet's prefetch runs on every host.

One copy for both workflows, so they cannot disagree on what an image must be: where it comes from (the
request, or its Glance record, refused when the request says another disk format), which digests the
download is checked against (the operator's win over the record's; both are checked when both exist),
how much a server may send, and which format the check insists on. Each workflow runs the activities
its own way (its phases, queues, timeouts and retries) through the ``run`` it passes in.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol, TypeVar

from temporalio.exceptions import ApplicationError

from workflows import contract
from workflows.activity_models import (
    CachedImage,
    CheckedImage,
    CheckImageInput,
    FetchImageInput,
    ResolvedImage,
    ResolveGlanceImageInput,
)
from workflows.fleet_models import RebuildOptions
from workflows.models import Phase, RebuildRequest
from workflows.snapshot_models import ResolveSnapshotInput

# Qcow2 metadata can make a file a little larger than its virtual size; allow that much more.
DOWNLOAD_SLACK_BYTES = 64 << 20

In = TypeVar("In")
Out = TypeVar("Out")


# What names the image and bounds it: a rebuild's request, or the options a fleet gives every child.
ImageOrder = RebuildRequest | RebuildOptions


class RunStep(Protocol):
    """Runs one activity of an image step, as the calling workflow runs its activities."""

    def __call__(
        self, phase: Phase, activity: contract.HostActivity[In, Out], argument: In
    ) -> Awaitable[Out]: ...


@dataclass(frozen=True)
class NewImage:
    """What fetch and check found: the image to put under the instance, and where it came from."""

    source: ResolvedImage
    cached: CachedImage
    checked: CheckedImage


async def fetch_and_check(
    order: ImageOrder,
    run: RunStep,
    after_fetch: Callable[[CachedImage], None] | None = None,
    refuse_contradiction: Callable[[], bool] = lambda: True,
) -> NewImage:
    """Resolve the image's source, download it into the host's cache, check what it really is.

    ``refuse_contradiction`` says whether a request whose disk format contradicts the Glance record is
    refused; it is asked only when it does (a fleet asks whether its patch applies).
    """
    snapshot_id = getattr(order, "snapshot_id", None)
    if snapshot_id is not None:
        # A snapshot is in the host's cache already: no fetch. Replay-safe without a patch marker: no
        # earlier history holds a request naming a snapshot.
        lookup = ResolveSnapshotInput(snapshot_id=snapshot_id)
        snapshot = await run(Phase.RESOLVE, contract.resolve_snapshot, lookup)
        source, cached = snapshot.source, snapshot.cached
    else:
        source = await resolve(order, run, refuse_contradiction)
        download = FetchImageInput(
            url=source.url,
            sha256=source.sha256,
            sha512=source.sha512,
            max_bytes=order.max_virtual_size_bytes + DOWNLOAD_SLACK_BYTES,
        )
        cached = await run(Phase.FETCH, contract.fetch_image, download)
    if after_fetch is not None:
        after_fetch(cached)
    # The format the request or the record declares: an image whose header says otherwise is refused.
    declared = source.disk_format
    check = CheckImageInput(
        sha256=cached.sha256, max_virtual_size_bytes=order.max_virtual_size_bytes, declared_format=declared
    )
    checked = await run(Phase.CHECK, contract.check_image, check)
    return NewImage(source, cached, checked)


async def resolve(
    order: ImageOrder, run: RunStep, refuse_contradiction: Callable[[], bool] = lambda: True
) -> ResolvedImage:
    """Where the image comes from and what it must be: the request, or its Glance record.

    Replay-safe without a patch marker: only requests naming a Glance image, which no earlier
    history holds, schedule the extra activity.
    """
    if order.glance_image_id is None or order.glance_url is None:
        assert order.image_url is not None
        return ResolvedImage(
            url=order.image_url,
            sha256=order.sha256,
            sha512=order.sha512,
            disk_format=order.disk_format,
        )
    # The request's size limit goes along: a record whose min_disk asks for more is refused.
    lookup = ResolveGlanceImageInput(
        glance_url=order.glance_url,
        image_id=order.glance_image_id,
        max_virtual_size_bytes=order.max_virtual_size_bytes,
    )
    record = await run(Phase.RESOLVE, contract.resolve_glance_image, lookup)
    if order.disk_format and order.disk_format != record.disk_format and refuse_contradiction():
        raise ApplicationError(
            f"Glance says image {order.glance_image_id} is {record.disk_format}, "
            f"the request says {order.disk_format}",
            type="InvalidRequest",
            non_retryable=True,
        )
    # Digests the operator gave win over the record's; both are checked when both exist.
    return record.model_copy(
        update={"sha256": order.sha256 or record.sha256, "sha512": order.sha512 or record.sha512}
    )
