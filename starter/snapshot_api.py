"""The snapshot endpoints of the HTTP API: the same operations as ``rebuild snapshot create | list |
show | delete`` (``starter/snapshots.py``), JSON in and out with the snapshot models.

| method and path | does | answers |
| --- | --- | --- |
| ``POST /v1/snapshots`` (a ``SnapshotRequest``) | start a snapshot (poll the list for it) | 201, 400, 409 |
| ``GET /v1/snapshots/{host}?instance=`` | the host's snapshots, oldest first | 200, 400 |
| ``GET /v1/snapshots/{host}/{snapshot_id}`` | one snapshot's record | 200, 404 |
| ``DELETE /v1/snapshots/{host}/{snapshot_id}`` | delete it | 200, 404 |
"""

from __future__ import annotations

from aiohttp import web

from starter.http_kit import CLIENT, caller, read_body, reply, reply_list, requester
from starter.openapi import Op, Param, route
from starter.rebuild_api import Started
from starter.snapshots import SnapshotMissing, snapshot_catalog, start_snapshot
from workflows.checks import check_host_name, check_instance_name
from workflows.snapshot_models import (
    SNAPSHOT_ID,
    SnapshotCatalogRequest,
    SnapshotCatalogResult,
    SnapshotRecord,
    StrictSnapshotRequest,
)


async def create(request: web.Request) -> web.Response:
    wanted = await read_body(request, StrictSnapshotRequest)
    caller(request).require("snapshot", wanted.host, wanted.instance)
    wanted = wanted.model_copy(update={"requested_by": requester(request, wanted.requested_by)})
    handle = await start_snapshot(request.app[CLIENT], wanted)
    return reply(Started(workflow_id=handle.id, run_id=handle.result_run_id), status=201)


def _host(request: web.Request) -> str:
    host = check_host_name(request.match_info["host"])
    caller(request).require("snapshot", host)
    return host


def _snapshot_id(request: web.Request) -> str:
    snapshot_id = request.match_info["snapshot_id"]
    if not SNAPSHOT_ID.fullmatch(snapshot_id):
        raise SnapshotMissing(f"no snapshot {snapshot_id[:40]!r}: an ID is 32 lowercase hex digits")
    return snapshot_id


async def index(request: web.Request) -> web.Response:
    instance = request.query.get("instance")
    if instance is not None:
        check_instance_name(instance)
    catalog = SnapshotCatalogRequest(host=_host(request), action="list", instance=instance)
    who = caller(request)
    found = (await snapshot_catalog(request.app[CLIENT], catalog)).snapshots
    return reply_list([record for record in found if who.may_reach(record.host, record.instance)])


async def show(request: web.Request) -> web.Response:
    host, snapshot_id = _host(request), _snapshot_id(request)
    found = await snapshot_catalog(request.app[CLIENT], SnapshotCatalogRequest(host=host, action="list"))
    for record in found.snapshots:
        if record.snapshot_id == snapshot_id and caller(request).may_reach(host, record.instance):
            return reply(record)
    raise SnapshotMissing(f"no snapshot {snapshot_id} on host {host}")


async def delete(request: web.Request) -> web.Response:
    host, snapshot_id = _host(request), _snapshot_id(request)
    found = await snapshot_catalog(request.app[CLIENT], SnapshotCatalogRequest(host=host, action="list"))
    if not any(
        record.snapshot_id == snapshot_id and caller(request).may_reach(host, record.instance)
        for record in found.snapshots
    ):
        raise SnapshotMissing(f"no snapshot {snapshot_id} on host {host}")
    catalog = SnapshotCatalogRequest(host=host, action="delete", snapshot_ids=(snapshot_id,))
    return reply(await snapshot_catalog(request.app[CLIENT], catalog))


def add_snapshot_routes(app: web.Application) -> None:
    route(
        app,
        "POST",
        "/v1/snapshots",
        create,
        Op(
            "startSnapshot",
            "snapshots",
            "Snapshot an instance's root disk while it runs",
            201,
            Started,
            errors=(400, 409),
            body=StrictSnapshotRequest,
        ),
    )
    route(
        app,
        "GET",
        "/v1/snapshots/{host}",
        index,
        Op(
            "listSnapshots",
            "snapshots",
            "A host's snapshots, oldest first",
            200,
            SnapshotRecord,
            many=True,
            errors=(400,),
            query=(Param("instance"),),
        ),
    )
    route(
        app,
        "GET",
        "/v1/snapshots/{host}/{snapshot_id}",
        show,
        Op("getSnapshot", "snapshots", "One snapshot's record", 200, SnapshotRecord, errors=(400, 404)),
    )
    route(app, "DELETE", "/v1/snapshots/{host}/{snapshot_id}", delete, Op(
        "deleteSnapshot", "snapshots", "Delete a snapshot", 200, SnapshotCatalogResult,
        errors=(400, 404)))  # fmt: skip
