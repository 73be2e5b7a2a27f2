"""``rebuild snapshot create | list | show | delete | publish``: a root disk kept to rebuild from.

A snapshot lives on the instance's host, in its worker's image cache; ``rebuild start NAME
--snapshot ID`` rebuilds from it (see ``starter/snapshots.py`` for the calls).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Annotated

import typer

from common.exit_codes import ExitCode
from starter.cli_context import AddressOption, Cli, JsonOption, command, command_group
from starter.cli_settings import THIS_HOST, HostOption

if TYPE_CHECKING:  # temporalio and the models load when a command runs, not for every --help
    from workflows.snapshot_models import (
        SnapshotCatalogRequest,
        SnapshotRecord,
        StrictPublishRequest,
        StrictSnapshotRequest,
    )

snapshot_app = command_group(
    "Snapshots: an instance's root disk copied while it runs, to rebuild from later."
)
IdArgument = Annotated[str, typer.Argument(help="The snapshot's ID (rebuild snapshot list shows them).")]


@command(snapshot_app, "create")
def create(
    ctx: typer.Context,
    instance: Annotated[str, typer.Argument(help="libvirt domain name of the instance.")],
    host: HostOption = THIS_HOST,
    label: Annotated[str | None, typer.Option(help="Free text kept with the snapshot.")] = None,
    quiesce: Annotated[
        bool | None,
        typer.Option(
            "--quiesce/--no-quiesce",
            help="Freeze the guest's file systems through its agent for the snapshot's instant "
            "(--quiesce fails when it cannot). Default: when the agent answers.",
        ),
    ] = None,
    keep: Annotated[
        int | None, typer.Option(help="Then keep only the instance's KEEP newest snapshots on the host.")
    ] = None,
    requested_by: Annotated[str, typer.Option(help="Who asked, shown in the Web UI.")] = os.environ.get(
        "USER", "unknown"
    ),
    address: AddressOption = None,
    as_json: JsonOption = False,
) -> None:
    """Snapshot INSTANCE's root disk while it runs (a shut-off one is copied as it is), and wait for it.

    Example: rebuild snapshot create web-1 --host kvm-07 --label "before the upgrade" --keep 5
    """
    from workflows.snapshot_models import StrictSnapshotRequest

    cli = Cli.of(ctx)
    with cli.refusing("snapshot request"):
        request = StrictSnapshotRequest(
            instance=instance,
            host=host,
            label=label,
            quiesce="auto" if quiesce is None else ("required" if quiesce else "off"),
            keep=keep,
            requested_by=requested_by,
        )
    cli.run(_create(cli, request, address))


async def _create(cli: Cli, request: StrictSnapshotRequest, address: str | None) -> int:
    from common.connection import connect
    from starter.snapshots import snapshot_result, start_snapshot

    handle = await start_snapshot(await connect(address), request)
    if not cli.json:
        cli.err.print(
            f"  snapshotting {request.instance} on {request.host}: workflow {handle.id}", markup=False
        )
    record = await snapshot_result(handle)
    if cli.json:
        cli.print_json(record)
    else:
        _show(cli, record)
    return ExitCode.OK


@command(snapshot_app, "list")
def list_command(
    ctx: typer.Context,
    host: HostOption = THIS_HOST,
    instance: Annotated[str | None, typer.Option(help="Only this instance's snapshots.")] = None,
    address: AddressOption = None,
    as_json: JsonOption = False,
) -> None:
    """The snapshots on a host, oldest first. Example: rebuild snapshot list --host kvm-07"""
    from workflows.snapshot_models import SnapshotCatalogRequest

    cli = Cli.of(ctx)
    cli.run(_list(cli, SnapshotCatalogRequest(host=host, action="list", instance=instance), address))


async def _list(cli: Cli, request: SnapshotCatalogRequest, address: str | None) -> int:
    from common.connection import connect
    from starter.snapshots import snapshot_catalog

    found = await snapshot_catalog(await connect(address), request)
    return cli.listing(
        found.snapshots, ("snapshot_id", "instance", "taken_at", "consistency", "size", "label")
    )


@command(snapshot_app, "show")
def show(
    ctx: typer.Context,
    snapshot_id: IdArgument,
    host: HostOption = THIS_HOST,
    address: AddressOption = None,
    as_json: JsonOption = False,
) -> None:
    """One snapshot's record. Example: rebuild snapshot show 3f2a... --host kvm-07"""
    cli = Cli.of(ctx)
    cli.run(_show_one(cli, snapshot_id, host, address))


async def _show_one(cli: Cli, snapshot_id: str, host: str, address: str | None) -> int:
    from common.connection import connect
    from starter.snapshots import SnapshotMissing, snapshot_catalog
    from workflows.snapshot_models import SnapshotCatalogRequest

    found = await snapshot_catalog(await connect(address), SnapshotCatalogRequest(host=host, action="list"))
    record = next((r for r in found.snapshots if r.snapshot_id == snapshot_id), None)
    if record is None:
        raise SnapshotMissing(f"no snapshot {snapshot_id} on host {host}")
    if cli.json:
        cli.print_json(record)
    else:
        _show(cli, record)
    return ExitCode.OK


@command(snapshot_app, "delete")
def delete(
    ctx: typer.Context,
    snapshot_ids: Annotated[list[str], typer.Argument(help="IDs of the snapshots to delete.")],
    host: HostOption = THIS_HOST,
    address: AddressOption = None,
    as_json: JsonOption = False,
) -> None:
    """Delete snapshots; an image an instance's disk still uses stays in the cache until it is unused.

    Example: rebuild snapshot delete 3f2a... --host kvm-07
    """
    from workflows.snapshot_models import SnapshotCatalogRequest

    cli = Cli.of(ctx)
    request = SnapshotCatalogRequest(host=host, action="delete", snapshot_ids=tuple(snapshot_ids))
    cli.run(_delete(cli, request, address))


async def _delete(cli: Cli, request: SnapshotCatalogRequest, address: str | None) -> int:
    from common.connection import connect
    from starter.snapshots import snapshot_catalog

    result = await snapshot_catalog(await connect(address), request)
    if cli.json:
        cli.print_json(result)
    else:
        cli.say(f"deleted {len(result.deleted)} snapshot(s): {', '.join(result.deleted)}")
    return ExitCode.OK


@command(snapshot_app, "publish")
def publish(
    ctx: typer.Context,
    snapshot_id: IdArgument,
    host: HostOption = THIS_HOST,
    name: Annotated[str | None, typer.Option(help="The Glance image's name.")] = None,
    address: AddressOption = None,
    as_json: JsonOption = False,
) -> None:
    """Upload a snapshot into the host worker's Glance (--glance-url), so any host can rebuild from it.

    Example: rebuild snapshot publish 3f2a... --host kvm-07, then on another host:
    rebuild start web-2 --glance https://glance:9292 --glance-image ID
    """
    from workflows.snapshot_models import StrictPublishRequest

    cli = Cli.of(ctx)
    with cli.refusing("publish request"):
        request = StrictPublishRequest(host=host, snapshot_id=snapshot_id, name=name)
    cli.run(_publish(cli, request, address))


async def _publish(cli: Cli, request: StrictPublishRequest, address: str | None) -> int:
    from common.connection import connect
    from starter.snapshots import publish_snapshot

    published = await publish_snapshot(await connect(address), request)
    if cli.json:
        cli.print_json(published)
    else:
        cli.say(f"published snapshot {published.snapshot_id} to {published.glance_url}")
        cli.say(f"  glance image: {published.glance_image_id} (sha512 {published.sha512[:16]}...)")
    return ExitCode.OK


def _show(cli: Cli, record: SnapshotRecord) -> None:
    frozen = f", frozen {record.frozen_ms:.0f} ms" if record.frozen_ms is not None else ""
    cli.say(f"snapshot {record.snapshot_id} of {record.instance} on {record.host}")
    cli.say(f"  taken at: {record.taken_at.isoformat(timespec='seconds')}")
    cli.say(f"  consistency: {record.consistency}{frozen}")
    cli.say(f"  size: {record.size} bytes (virtual {record.virtual_size}), sha256 {record.sha256}")
    if record.label:
        cli.say(f"  label: {record.label}")
    cli.say(
        f"  rebuild from it: rebuild start {record.instance} --host {record.host} "
        f"--snapshot {record.snapshot_id}"
    )
