"""The rebuild endpoints of the HTTP API: the same operations as ``rebuild start | status | list |
approve | confirm | revert | abort``, JSON in and out with the workflow's own models (their strict forms).

| method and path | does | answers |
| --- | --- | --- |
| ``POST /v1/rebuilds`` (a ``RebuildRequest``) | start; answers once past inspect | 201, 400, 409 running |
| ``GET /v1/rebuilds?phase=&host=&running=true&limit=50&cursor=`` | list, a page at a time | 200, 400 |
| ``GET /v1/rebuilds/{host}/{instance}`` | status; the result once finished | 200, 404 |
| ``POST /v1/rebuilds/{host}/{instance}/approve|confirm|revert`` | send the signal | 202, 404, 409 |
| ``POST /v1/rebuilds/{host}/{instance}/abort`` (``{"reason": ...}``) | abort through the update | 200, 409 |
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import quote

from aiohttp import web
from pydantic import BaseModel
from temporalio.client import Client

from starter.api_clients import Forbidden, requester_client
from starter.errors import BadRequest
from starter.http_kit import (
    CLIENT,
    answered,
    caller,
    error,
    query_cursor,
    query_flag,
    query_int,
    read_body,
    read_json,
    reply,
    reply_list,
    requester,
    with_next_page,
)
from starter.identity_options import hash_password
from starter.openapi import Op, Param, route
from starter.rebuilds import (
    DECISIONS,
    RebuildDescription,
    RebuildSummary,
    abort_rebuild,
    describe_rebuild,
    list_query,
    list_rebuilds_page,
    rebuild_requested_by,
    send_decision,
    start_past_inspect,
)
from starter.status_cache import StatusCache
from workflows.identity import identity_problems
from workflows.models import AbortAnswer, StrictAbortRequest, StrictDecision, StrictRebuildRequest

STATUS: web.AppKey[StatusCache[RebuildDescription]] = web.AppKey("status", StatusCache)
# How old a status answer may be: pollers of one rebuild share one trip to Temporal per this long.
STATUS_TTL_SECONDS = 1.0
MAX_LIST_LIMIT = 1000
# SHA-512 crypt costs time in proportion to the password's length (passlib's builtin backend: 2 s for
# 256 bytes here), so the length is capped, and hashing runs on a small pool, never on the event loop.
MAX_ADMIN_PASSWORD_BYTES = 256
HASHERS = 2
# More passwords than this waiting for a hasher are refused (429), not queued behind one another.
MAX_PENDING_HASHES = 8
_hashers = ThreadPoolExecutor(HASHERS, thread_name_prefix="hash-password")
_pending_hashes = asyncio.BoundedSemaphore(MAX_PENDING_HASHES)


class Started(BaseModel):
    workflow_id: str
    run_id: str | None
    # The phase it had reached when the answer was given (past inspect); None: it had ended already.
    phase: str | None = None


class Sent(BaseModel):
    workflow_id: str
    signal: str


def _split_admin_password(payload: Any) -> tuple[Any, str | None]:
    """Nova's ``adminPass`` arrives in clear: taken out of the body, to be hashed once the rest is valid."""
    identity = payload.get("identity") if isinstance(payload, dict) else None
    if not isinstance(identity, dict) or "admin_password" not in identity:
        return payload, None
    identity = dict(identity)
    password = identity.pop("admin_password")
    if not isinstance(password, str):
        raise BadRequest("identity.admin_password must be a string")
    if len(password.encode()) > MAX_ADMIN_PASSWORD_BYTES:
        raise BadRequest(f"identity.admin_password must be at most {MAX_ADMIN_PASSWORD_BYTES} bytes")
    return {**payload, "identity": identity}, password


async def _hashed(password: str) -> str:
    """The SHA-512 crypt hash, computed off the event loop by a bounded pool."""
    if not password:
        return ""
    if _pending_hashes.locked():
        raise TooBusy("too many admin passwords are being hashed; try again in a few seconds")
    async with _pending_hashes:
        return await asyncio.get_running_loop().run_in_executor(_hashers, hash_password, password)


class TooBusy(Exception):
    """More passwords wait for a hasher than the API takes (HTTP 429)."""


async def start(request: web.Request) -> web.Response:
    body, password = _split_admin_password(await read_json(request))
    # Everything is checked (the body, the client's scopes, the identity) before the password is hashed.
    rebuild = StrictRebuildRequest.model_validate(body)
    caller(request).require("start", rebuild.host, rebuild.instance)
    if password is not None and rebuild.identity is not None:
        if problems := identity_problems(rebuild.identity):
            raise BadRequest("; ".join(problems))
        try:
            hashed = await _hashed(password)
        except TooBusy as exc:
            return error(429, str(exc), {"Retry-After": "5"})
        identity = rebuild.identity.model_copy(update={"admin_password_hash": hashed})
        rebuild = rebuild.model_copy(update={"identity": identity})
    rebuild = rebuild.model_copy(update={"requested_by": requester(request, rebuild.requested_by)})
    try:
        # Answered once past inspect: a wrong name or an unsupported root disk is a 400 now.
        handle, phase = await start_past_inspect(request.app[CLIENT], rebuild)
    finally:
        request.app[STATUS].forget(rebuild.host, rebuild.instance)
    started = Started(
        workflow_id=handle.id, run_id=handle.result_run_id, phase=phase.value if phase else None
    )
    return reply(
        started,
        status=201,
        headers={"Location": f"/v1/rebuilds/{quote(rebuild.host)}/{quote(rebuild.instance)}"},
    )


async def show(request: web.Request) -> web.Response:
    host, instance = request.match_info["host"], request.match_info["instance"]
    if not caller(request).may_reach(host, instance):
        raise Forbidden(f"client {caller(request).name} may not see instance {instance} on {host}")
    return reply(await request.app[STATUS].get(host, instance))


async def index(request: web.Request) -> web.Response:
    query = list_query(request.query.get("phase"), request.query.get("host"), query_flag(request, "running"))
    limit = query_int(request, "limit", 50, 1, MAX_LIST_LIMIT)
    rows, after = await list_rebuilds_page(request.app[CLIENT], query, limit, query_cursor(request))
    # A client lists only the rebuilds in its scope (a page may hold fewer rows than the limit).
    who = caller(request)
    shown = reply_list([r for r in rows if r.host and r.instance and who.may_reach(r.host, r.instance)])
    return with_next_page(request, shown, after)


async def decide(request: web.Request) -> web.Response:
    host, instance, verdict = (request.match_info[k] for k in ("host", "instance", "verdict"))
    decision = await read_body(request, StrictDecision, optional=True)
    who = caller(request)
    who.require(verdict, host, instance)
    if verdict == "approve" and "self-approve" not in who.verbs:
        started_by = await rebuild_requested_by(request.app[CLIENT], instance, host)
        if requester_client(started_by) == who.name:
            raise Forbidden(
                f"client {who.name} started this rebuild and may not approve it itself: "
                "another client must (or give this one the verb self-approve)"
            )
    decision = decision.model_copy(update={"requested_by": requester(request, decision.requested_by)})
    workflow_id = await send_decision(request.app[CLIENT], instance, host, verdict, decision)
    request.app[STATUS].forget(host, instance)
    return reply(Sent(workflow_id=workflow_id, signal=verdict), status=202)


async def abort(request: web.Request) -> web.Response:
    host, instance = request.match_info["host"], request.match_info["instance"]
    wanted = await read_body(request, StrictAbortRequest)
    caller(request).require("abort", host, instance)
    wanted = wanted.model_copy(update={"requested_by": requester(request, wanted.requested_by)})
    answer = await abort_rebuild(request.app[CLIENT], instance, host, wanted)
    request.app[STATUS].forget(host, instance)
    return answered(answer, answer.accepted)


def add_rebuild_routes(app: web.Application, client: Client, status_ttl: float) -> None:
    async def describe(host: str, instance: str) -> RebuildDescription:
        return await describe_rebuild(client, instance, host)

    app[STATUS] = StatusCache(describe, status_ttl)
    route(
        app,
        "POST",
        "/v1/rebuilds",
        start,
        Op(
            "startRebuild",
            "rebuilds",
            "Start a rebuild",
            201,
            Started,
            errors=(400, 409, 429),
            body=StrictRebuildRequest,
            headers={"Location": "the rebuild's status"},
        ),
    )
    route(
        app,
        "GET",
        "/v1/rebuilds",
        index,
        Op(
            "listRebuilds",
            "rebuilds",
            "List rebuilds, newest first",
            200,
            RebuildSummary,
            many=True,
            errors=(400,),
            query=LIST_FILTERS,
            headers={"Link": 'the next page: <...>; rel="next"'},
        ),
    )
    route(
        app,
        "GET",
        "/v1/rebuilds/{host}/{instance}",
        show,
        Op("getRebuild", "rebuilds", "A rebuild's status", 200, RebuildDescription, errors=(404,)),
    )
    route(
        app,
        "POST",
        "/v1/rebuilds/{host}/{instance}/abort",
        abort,
        Op(
            "abortRebuild",
            "decisions",
            "Abort (answers whether it was accepted)",
            200,
            AbortAnswer,
            errors=(400, 404, 409),
            body=StrictAbortRequest,
        ),
    )
    route(app, "POST", f"/v1/rebuilds/{{host}}/{{instance}}/{{verdict:{'|'.join(DECISIONS)}}}", decide, Op(
        "decideRebuild", "decisions", "Send approve, confirm or revert", 202, Sent,
        errors=(400, 404, 409), body=StrictDecision, body_required=False))  # fmt: skip


LIST_FILTERS = (
    Param("phase"),
    Param("host"),
    Param("running", "boolean"),
    Param("limit", "integer", minimum=1, maximum=MAX_LIST_LIMIT, default=50),
    Param("cursor", description='the next page, as the previous page\'s Link: <...>; rel="next" gives it'),
)
