"""The fleet part of the HTTP API: the same operations as ``rebuild fleet``, JSON in and out.

| method and path | does | answers |
| --- | --- | --- |
| ``POST /v1/fleets`` (a ``FleetRequest``) | start a fleet | 201, 400, 409 a fleet of that name runs |
| ``GET /v1/fleets?running=true`` | list fleets | 200 |
| ``GET /v1/fleets/{name}`` | counts, limits, running rebuilds with phases, report | 200, 404 |
| ``GET /v1/fleets/{name}/instances?state=&offset=&limit=`` | every instance's state, paged | 200, 404 |
| ``POST /v1/fleets/{name}/pause`` and ``/resume`` | steer | 200 accepted, 409 refused or not running |
| ``POST /v1/fleets/{name}/batch-size`` (``{"batch_size": N}``) | from the next batch on | 200, 400, 409 |
| ``POST /v1/fleets/{name}/abort`` (``{"reason": ...}``) | abort, children roll back | 200, 409 |
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from pydantic import BaseModel
from temporalio.client import Client

from starter.errors import FleetAlreadyRunning, FleetNotRunning, UnknownFleet
from starter.fleets import (
    CONTROLS,
    FleetDescription,
    FleetSummary,
    abort_fleet,
    control_fleet,
    describe_fleet,
    fleet_instances,
    list_fleets,
    resize_fleet,
    start_fleet,
)
from workflows.fleet_models import (
    ControlAnswer,
    FleetInstances,
    InstanceState,
    StrictBatchSize,
    StrictFleetAbort,
    StrictFleetRequest,
)

Handler = Callable[[web.Request], Awaitable[web.Response]]


class FleetStarted(BaseModel):
    name: str
    workflow_id: str
    run_id: str | None


def _json(model: BaseModel, status: int = 200) -> web.Response:
    return web.Response(text=model.model_dump_json(), status=status, content_type="application/json")


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def _fleet_errors(handler: Handler) -> Handler:
    async def translated(request: web.Request) -> web.Response:
        try:
            return await handler(request)
        except UnknownFleet as exc:
            return _error(404, str(exc))
        except (FleetAlreadyRunning, FleetNotRunning) as exc:
            return _error(409, str(exc))

    return translated


async def _body(request: web.Request) -> Any:
    try:
        return await request.json()
    except ValueError:
        raise ValueError("the body must be JSON") from None


def add_fleet_routes(
    app: web.Application,
    client_key: web.AppKey[Client],
    requester: Callable[[web.Request, str], str],
) -> None:
    """Add the fleet endpoints; the application's middlewares answer 400 for invalid bodies.

    ``requester`` names the authenticated caller, as for single rebuilds.
    """

    async def start(request: web.Request) -> web.Response:
        fleet = StrictFleetRequest.model_validate(await _body(request)).wire()
        who = requester(request, fleet.rebuild.requested_by)
        fleet = fleet.model_copy(update={"rebuild": fleet.rebuild.model_copy(update={"requested_by": who})})
        handle = await start_fleet(request.app[client_key], fleet)
        return _json(FleetStarted(name=fleet.name, workflow_id=handle.id, run_id=handle.result_run_id), 201)

    async def index(request: web.Request) -> web.Response:
        limit = min(max(int(request.query.get("limit", "50")), 1), 1000)
        rows = await list_fleets(request.app[client_key], request.query.get("running") == "true", limit)
        return web.json_response([row.model_dump() for row in rows])

    async def show(request: web.Request) -> web.Response:
        return _json(await describe_fleet(request.app[client_key], request.match_info["name"]))

    async def instances(request: web.Request) -> web.Response:
        state = request.query.get("state")
        page = await fleet_instances(
            request.app[client_key],
            request.match_info["name"],
            InstanceState(state) if state else None,
            int(request.query.get("offset", "0")),
            min(max(int(request.query.get("limit", "1000")), 1), 5000),
        )
        return _json(page)

    async def control(request: web.Request) -> web.Response:
        name, action = request.match_info["name"], request.path.rsplit("/", 1)[1]
        answer = await control_fleet(request.app[client_key], name, action)
        return _json(answer, 200 if answer.accepted else 409)

    async def batch_size(request: web.Request) -> web.Response:
        change = StrictBatchSize.model_validate(await _body(request))
        answer = await resize_fleet(request.app[client_key], request.match_info["name"], change)
        return _json(answer, 200 if answer.accepted else 409)

    async def abort(request: web.Request) -> web.Response:
        abort_request = StrictFleetAbort.model_validate(await _body(request))
        abort_request = abort_request.model_copy(
            update={"requested_by": requester(request, abort_request.requested_by)}
        )
        answer = await abort_fleet(request.app[client_key], request.match_info["name"], abort_request)
        return _json(answer, 200 if answer.accepted else 409)

    app.router.add_post("/v1/fleets", _fleet_errors(start))
    app.router.add_get("/v1/fleets", _fleet_errors(index))
    app.router.add_get("/v1/fleets/{name}", _fleet_errors(show))
    app.router.add_get("/v1/fleets/{name}/instances", _fleet_errors(instances))
    for action in CONTROLS:
        app.router.add_post(f"/v1/fleets/{{name}}/{action}", _fleet_errors(control))
    app.router.add_post("/v1/fleets/{name}/batch-size", _fleet_errors(batch_size))
    app.router.add_post("/v1/fleets/{name}/abort", _fleet_errors(abort))


FLEET_MODELS: list[type[BaseModel]] = [
    StrictFleetRequest,
    FleetStarted,
    FleetDescription,
    FleetSummary,
    FleetInstances,
    StrictBatchSize,
    StrictFleetAbort,
    ControlAnswer,
]


def fleet_openapi_paths(
    ref: Callable[[str], dict[str, Any]], answers: Callable[..., dict[str, Any]]
) -> dict[str, Any]:
    name = [{"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}]
    query = [
        {"name": n, "in": "query", "schema": {"type": t}}
        for n, t in (("state", "string"), ("offset", "integer"), ("limit", "integer"))
    ]
    listing = {"type": "array", "items": {"$ref": "#/components/schemas/FleetSummary"}}
    paths: dict[str, Any] = {
        "/v1/fleets": {
            "post": {"operationId": "startFleet", "tags": ["fleets"], "summary": "Start a rolling rebuild",
                     "requestBody": {"required": True, **ref("FleetRequest")},
                     "responses": answers(201, "FleetStarted", 400, 409)},
            "get": {"operationId": "listFleets", "tags": ["fleets"], "summary": "List fleets",
                    "parameters": [{"name": n, "in": "query", "schema": {"type": t}}
                                   for n, t in (("running", "boolean"), ("limit", "integer"))],
                    "responses": answers(200, "FleetSummary list", 400, schema=listing)},
        },
        "/v1/fleets/{name}": {
            "get": {"operationId": "getFleet", "tags": ["fleets"], "summary": "A fleet's progress",
                    "parameters": name, "responses": answers(200, "FleetDescription", 404)},
        },
        "/v1/fleets/{name}/instances": {
            "get": {"operationId": "listFleetInstances", "tags": ["fleets"],
                    "summary": "Every instance's state, paged", "parameters": name + query,
                    "responses": answers(200, "FleetInstances", 400, 404)},
        },
        "/v1/fleets/{name}/batch-size": {
            "post": {"operationId": "setFleetBatchSize", "tags": ["fleets"],
                     "summary": "Change the batch size from the next batch on", "parameters": name,
                     "requestBody": {"required": True, **ref("BatchSize")},
                     "responses": answers(200, "ControlAnswer", 400, 404, 409)},
        },
        "/v1/fleets/{name}/abort": {
            "post": {"operationId": "abortFleet", "tags": ["fleets"],
                     "summary": "Abort: start nothing more, running rebuilds roll back", "parameters": name,
                     "requestBody": {"required": True, **ref("FleetAbort")},
                     "responses": answers(200, "ControlAnswer", 400, 404, 409)},
        },
    }  # fmt: skip
    for action in CONTROLS:
        paths[f"/v1/fleets/{{name}}/{action}"] = {
            "post": {"operationId": f"{action}Fleet", "tags": ["fleets"],
                     "summary": f"{action.capitalize()} the fleet", "parameters": name,
                     "responses": answers(200, "ControlAnswer", 404, 409)},
        }  # fmt: skip
    return paths
