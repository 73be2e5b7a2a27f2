"""The rebuild endpoints of the HTTP API: the same operations as ``rebuild start | status | list |
approve | confirm | revert | abort``, JSON in and out with the workflow's own models (their strict forms).

| method and path | does | answers |
| --- | --- | --- |
| ``POST /v1/rebuilds`` (a ``RebuildRequest``) | start a rebuild | 201, 400, 409 already running |
| ``GET /v1/rebuilds?phase=&host=&running=true&limit=50`` | list through visibility | 200, 400 |
| ``GET /v1/rebuilds/{host}/{instance}`` | status; the result once finished | 200, 404 |
| ``POST /v1/rebuilds/{host}/{instance}/approve|confirm|revert`` | send the signal | 202, 404, 409 |
| ``POST /v1/rebuilds/{host}/{instance}/abort`` (``{"reason": ...}``) | abort through the update | 200, 409 |
"""

from __future__ import annotations

from typing import Any

from aiohttp import web
from pydantic import BaseModel
from temporalio.client import Client

from starter.http_kit import (
    CLIENT,
    answered,
    query_flag,
    query_int,
    read_body,
    read_json,
    reply,
    reply_list,
    requester,
)
from starter.identity_options import hash_password
from starter.rebuilds import (
    DECISIONS,
    RebuildDescription,
    abort_rebuild,
    describe_rebuild,
    list_query,
    list_rebuilds,
    send_decision,
    start_rebuild,
)
from starter.status_cache import StatusCache
from workflows.models import StrictAbortRequest, StrictDecision, StrictRebuildRequest

STATUS: web.AppKey[StatusCache[RebuildDescription]] = web.AppKey("status", StatusCache)
# How old a status answer may be: pollers of one rebuild share one trip to Temporal per this long.
STATUS_TTL_SECONDS = 1.0
MAX_LIST_LIMIT = 1000


class Started(BaseModel):
    workflow_id: str
    run_id: str | None


class Sent(BaseModel):
    workflow_id: str
    signal: str


def _hash_admin_password(payload: Any) -> Any:
    """Nova's ``adminPass`` arrives in clear over the API: it is hashed here, before any workflow."""
    identity = payload.get("identity") if isinstance(payload, dict) else None
    if not isinstance(identity, dict) or "admin_password" not in identity:
        return payload
    identity = dict(identity)
    password = identity.pop("admin_password")
    if not isinstance(password, str):
        raise ValueError("identity.admin_password must be a string")
    identity["admin_password_hash"] = hash_password(password) if password else ""
    return {**payload, "identity": identity}


async def start(request: web.Request) -> web.Response:
    rebuild = StrictRebuildRequest.model_validate(_hash_admin_password(await read_json(request)))
    rebuild = rebuild.model_copy(update={"requested_by": requester(request, rebuild.requested_by)})
    handle = await start_rebuild(request.app[CLIENT], rebuild)
    request.app[STATUS].forget(rebuild.host, rebuild.instance)
    return reply(Started(workflow_id=handle.id, run_id=handle.result_run_id), status=201)


async def show(request: web.Request) -> web.Response:
    host, instance = request.match_info["host"], request.match_info["instance"]
    return reply(await request.app[STATUS].get(host, instance))


async def index(request: web.Request) -> web.Response:
    query = list_query(request.query.get("phase"), request.query.get("host"), query_flag(request, "running"))
    limit = query_int(request, "limit", 50, 1, MAX_LIST_LIMIT)
    return reply_list(await list_rebuilds(request.app[CLIENT], query, limit))


async def decide(request: web.Request) -> web.Response:
    host, instance, verdict = (request.match_info[k] for k in ("host", "instance", "verdict"))
    decision = await read_body(request, StrictDecision, optional=True)
    decision = decision.model_copy(update={"requested_by": requester(request, decision.requested_by)})
    workflow_id = await send_decision(request.app[CLIENT], instance, host, verdict, decision)
    request.app[STATUS].forget(host, instance)
    return reply(Sent(workflow_id=workflow_id, signal=verdict), status=202)


async def abort(request: web.Request) -> web.Response:
    host, instance = request.match_info["host"], request.match_info["instance"]
    wanted = await read_body(request, StrictAbortRequest)
    wanted = wanted.model_copy(update={"requested_by": requester(request, wanted.requested_by)})
    answer = await abort_rebuild(request.app[CLIENT], instance, host, wanted)
    request.app[STATUS].forget(host, instance)
    return answered(answer, answer.accepted)


def add_rebuild_routes(app: web.Application, client: Client, status_ttl: float) -> None:
    async def describe(host: str, instance: str) -> RebuildDescription:
        return await describe_rebuild(client, instance, host)

    app[STATUS] = StatusCache(describe, status_ttl)
    app.router.add_post("/v1/rebuilds", start)
    app.router.add_get("/v1/rebuilds", index)
    app.router.add_get("/v1/rebuilds/{host}/{instance}", show)
    app.router.add_post("/v1/rebuilds/{host}/{instance}/abort", abort)
    verdicts = "|".join(DECISIONS)
    app.router.add_post(f"/v1/rebuilds/{{host}}/{{instance}}/{{verdict:{verdicts}}}", decide)
