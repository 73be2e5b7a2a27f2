"""The fleet part of the HTTP API: the same operations as ``rebuild fleet``, JSON in and out.

| method and path | does | answers |
| --- | --- | --- |
| ``POST /v1/fleets`` (a ``FleetRequest``) | start a fleet | 201, 400, 409 a fleet of that name runs |
| ``GET /v1/fleets?running=true&limit=50`` | list fleets | 200, 400 |
| ``GET /v1/fleets/{name}`` | counts, limits, running rebuilds with phases, report | 200, 404 |
| ``GET /v1/fleets/{name}/instances?state=&offset=&limit=`` | every instance's state, paged | 200, 400, 404 |
| ``POST /v1/fleets/{name}/pause`` and ``/resume`` | steer | 200 accepted, 409 refused or not running |
| ``POST /v1/fleets/{name}/batch-size`` (``{"batch_size": N}``) | from the next batch on | 200, 400, 409 |
| ``POST /v1/fleets/{name}/abort`` (``{"reason": ...}``) | abort, children roll back | 200, 409 |
"""

from __future__ import annotations

from aiohttp import web
from pydantic import BaseModel

from starter.api_clients import ApiClient, Forbidden
from starter.fleets import (
    CONTROLS,
    FleetDescription,
    FleetSummary,
    abort_fleet,
    control_fleet,
    describe_fleet,
    fleet_hosts,
    fleet_instances,
    list_fleets,
    resize_fleet,
    start_fleet,
)
from starter.http_kit import (
    CLIENT,
    BadQuery,
    Handler,
    answered,
    caller,
    query_flag,
    query_int,
    read_body,
    reply,
    reply_list,
    requester,
)
from starter.openapi import Op, Param, route
from workflows.fleet_models import (
    ControlAnswer,
    FleetInstances,
    FleetRequest,
    InstanceState,
    StrictBatchSize,
    StrictFleetAbort,
    StrictFleetRequest,
)

MAX_LIST_LIMIT = 1000
MAX_PAGE = 5000


class FleetStarted(BaseModel):
    name: str
    workflow_id: str
    run_id: str | None


async def start(request: web.Request) -> web.Response:
    fleet = (await read_body(request, StrictFleetRequest)).wire()
    _require_fleet_scope(caller(request), fleet)
    who = requester(request, fleet.rebuild.requested_by)
    fleet = fleet.model_copy(update={"rebuild": fleet.rebuild.model_copy(update={"requested_by": who})})
    handle = await start_fleet(request.app[CLIENT], fleet)
    return reply(FleetStarted(name=fleet.name, workflow_id=handle.id, run_id=handle.result_run_id), 201)


def _require_fleet_scope(who: ApiClient, fleet: FleetRequest) -> None:
    """A fleet needs the verb fleet, every host in scope, and every instance it can select: listed ones
    each in scope, a name pattern only where the client's instances are ``*`` or that very pattern."""
    selection = fleet.selection
    who.require_hosts("fleet", selection.all_hosts() if selection else [])
    if selection is None:
        return
    for target in selection.instances:
        who.require("fleet", target.host, target.instance)
    if selection.name_pattern is not None and not who.covers_pattern(selection.name_pattern):
        raise Forbidden(
            f"client {who.name} may not start a fleet over the pattern {selection.name_pattern!r}: "
            "its instances scope must be * or that pattern"
        )


async def _require_fleet_hosts(request: web.Request) -> None:
    """Steering a fleet (pause, resume, batch size, abort) needs every host it touches in scope."""
    caller(request).require_hosts("fleet", await fleet_hosts(request.app[CLIENT], request.match_info["name"]))


def _needs_fleet(handler: Handler) -> Handler:
    """Every fleet endpoint, reading ones included, is for clients with the verb fleet."""

    async def checked(request: web.Request) -> web.StreamResponse:
        caller(request).require("fleet")
        return await handler(request)

    return checked


async def index(request: web.Request) -> web.Response:
    limit = query_int(request, "limit", 50, 1, MAX_LIST_LIMIT)
    return reply_list(await list_fleets(request.app[CLIENT], query_flag(request, "running"), limit))


async def show(request: web.Request) -> web.Response:
    return reply(await describe_fleet(request.app[CLIENT], request.match_info["name"]))


async def instances(request: web.Request) -> web.Response:
    state = request.query.get("state")
    try:
        wanted = InstanceState(state) if state else None
    except ValueError:
        raise BadQuery(f"state must be one of {', '.join(InstanceState)}, not {state!r}") from None
    page = await fleet_instances(
        request.app[CLIENT],
        request.match_info["name"],
        wanted,
        query_int(request, "offset", 0, 0, None),
        query_int(request, "limit", 1000, 1, MAX_PAGE),
    )
    return reply(page)


async def control_handler(request: web.Request) -> web.Response:
    name, action = request.match_info["name"], request.path.rsplit("/", 1)[1]
    await _require_fleet_hosts(request)
    answer = await control_fleet(request.app[CLIENT], name, action)
    return answered(answer, answer.accepted)


async def batch_size(request: web.Request) -> web.Response:
    change = await read_body(request, StrictBatchSize)
    await _require_fleet_hosts(request)
    answer = await resize_fleet(request.app[CLIENT], request.match_info["name"], change)
    return answered(answer, answer.accepted)


async def abort(request: web.Request) -> web.Response:
    wanted = await read_body(request, StrictFleetAbort)
    await _require_fleet_hosts(request)
    wanted = wanted.model_copy(update={"requested_by": requester(request, wanted.requested_by)})
    answer = await abort_fleet(request.app[CLIENT], request.match_info["name"], wanted)
    return answered(answer, answer.accepted)


def add_fleet_routes(app: web.Application) -> None:
    """The fleet endpoints; the application's middlewares (``starter.http_kit``) answer its errors."""
    control = ControlAnswer
    route(
        app,
        "POST",
        "/v1/fleets",
        _needs_fleet(start),
        Op(
            "startFleet",
            "fleets",
            "Start a rolling rebuild",
            201,
            FleetStarted,
            errors=(400, 409),
            body=StrictFleetRequest,
        ),
    )
    route(
        app,
        "GET",
        "/v1/fleets",
        _needs_fleet(index),
        Op(
            "listFleets",
            "fleets",
            "List fleets",
            200,
            FleetSummary,
            many=True,
            errors=(400,),
            query=(
                Param("running", "boolean"),
                Param("limit", "integer", minimum=1, maximum=MAX_LIST_LIMIT, default=50),
            ),
        ),
    )
    route(
        app,
        "GET",
        "/v1/fleets/{name}",
        _needs_fleet(show),
        Op("getFleet", "fleets", "A fleet's progress", 200, FleetDescription, errors=(404,)),
    )
    route(
        app,
        "GET",
        "/v1/fleets/{name}/instances",
        _needs_fleet(instances),
        Op(
            "listFleetInstances",
            "fleets",
            "Every instance's state, paged",
            200,
            FleetInstances,
            errors=(400, 404),
            query=(
                Param("state"),
                Param("offset", "integer", minimum=0, default=0),
                Param("limit", "integer", minimum=1, maximum=MAX_PAGE, default=1000),
            ),
        ),
    )
    for action in CONTROLS:
        route(
            app,
            "POST",
            f"/v1/fleets/{{name}}/{action}",
            _needs_fleet(control_handler),
            Op(
                f"{action}Fleet",
                "fleets",
                f"{action.capitalize()} the fleet",
                200,
                control,
                errors=(404, 409),
            ),
        )
    route(
        app,
        "POST",
        "/v1/fleets/{name}/batch-size",
        _needs_fleet(batch_size),
        Op(
            "setFleetBatchSize",
            "fleets",
            "Change the batch size from the next batch on",
            200,
            control,
            errors=(400, 404, 409),
            body=StrictBatchSize,
        ),
    )
    route(app, "POST", "/v1/fleets/{name}/abort", _needs_fleet(abort), Op(
        "abortFleet", "fleets", "Abort: start nothing more, running rebuilds roll back", 200, control,
        errors=(400, 404, 409), body=StrictFleetAbort))  # fmt: skip
