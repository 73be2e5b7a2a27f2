"""``rebuild-api``: the HTTP API other services use to start, watch and steer rebuilds.

JSON in and out, with the workflow's own pydantic models (their strict forms: unknown fields and bad
values are refused here, at the edge); errors are JSON too: 400 bad input (including a host no worker
serves), 401 no or wrong bearer token (and nothing changes), 404 unknown rebuild, 409 already running /
not running. The process's exit codes are the CLI's (``common.exit_codes``).
"""

from __future__ import annotations

import asyncio
import hmac
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from aiohttp import web
from pydantic import BaseModel, ValidationError
from temporalio.client import Client

from common.connection import TemporalUnavailable, connect
from common.exit_codes import ExitCode
from common.exit_codes import table as exit_code_table
from starter.identity_options import hash_password
from starter.rebuilds import (
    DECISIONS,
    BadFilter,
    NoWorkerOnHost,
    RebuildAlreadyRunning,
    RebuildDescription,
    RebuildNotRunning,
    RebuildSummary,
    UnknownRebuild,
    abort_rebuild,
    describe_rebuild,
    list_query,
    list_rebuilds,
    send_decision,
    start_rebuild,
    validation_problems,
)
from workflows.models import AbortAnswer, StrictAbortRequest, StrictDecision, StrictRebuildRequest

CLIENT: web.AppKey[Client] = web.AppKey("client", Client)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Middleware = Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]


class Started(BaseModel):
    workflow_id: str
    run_id: str | None


class Sent(BaseModel):
    workflow_id: str
    signal: str


class ErrorBody(BaseModel):
    error: str


def error(status: int, message: str) -> web.Response:
    return web.json_response(ErrorBody(error=message).model_dump(), status=status)


def reply(model: BaseModel, status: int = 200) -> web.Response:
    return web.Response(text=model.model_dump_json(), status=status, content_type="application/json")


def bearer_auth(token: str) -> Middleware:
    expected = f"Bearer {token}".encode()

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path == "/openapi.json":
            return await handler(request)
        given = request.headers.get("Authorization", "").encode()
        if not hmac.compare_digest(given, expected):
            return error(401, "missing or wrong bearer token")
        return await handler(request)

    return check


@web.middleware
async def translate_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ValidationError as exc:
        problems = validation_problems(exc)
        return error(400, f"invalid request: {problems}")
    except (BadFilter, NoWorkerOnHost, ValueError) as exc:
        return error(400, str(exc))
    except UnknownRebuild as exc:
        return error(404, str(exc))
    except (RebuildAlreadyRunning, RebuildNotRunning) as exc:
        return error(409, str(exc))


async def body(request: web.Request) -> Any:
    try:
        return await request.json()
    except ValueError:
        raise ValueError("the body must be JSON") from None


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
    rebuild = StrictRebuildRequest.model_validate(_hash_admin_password(await body(request)))
    handle = await start_rebuild(request.app[CLIENT], rebuild)
    return reply(Started(workflow_id=handle.id, run_id=handle.result_run_id), status=201)


async def show(request: web.Request) -> web.Response:
    host, instance = request.match_info["host"], request.match_info["instance"]
    return reply(await describe_rebuild(request.app[CLIENT], instance, host))


async def index(request: web.Request) -> web.Response:
    query = list_query(
        request.query.get("phase"), request.query.get("host"), request.query.get("running") == "true"
    )
    limit = int(request.query.get("limit", "50"))
    rows = await list_rebuilds(request.app[CLIENT], query, min(max(limit, 1), 1000))
    return web.json_response([row.model_dump() for row in rows])


async def decide(request: web.Request) -> web.Response:
    host, instance, verdict = (request.match_info[k] for k in ("host", "instance", "verdict"))
    decision = StrictDecision.model_validate(await body(request) if request.can_read_body else {})
    workflow_id = await send_decision(request.app[CLIENT], instance, host, verdict, decision)
    return reply(Sent(workflow_id=workflow_id, signal=verdict), status=202)


async def abort(request: web.Request) -> web.Response:
    host, instance = request.match_info["host"], request.match_info["instance"]
    answer = await abort_rebuild(
        request.app[CLIENT], instance, host, StrictAbortRequest.model_validate(await body(request))
    )
    return reply(answer, status=200 if answer.accepted else 409)


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(openapi_document())


def create_app(client: Client, token: str) -> web.Application:
    if not token:
        raise ValueError("the API needs a bearer token")
    app = web.Application(middlewares=[bearer_auth(token), translate_errors])  # type: ignore[list-item]
    app[CLIENT] = client
    app.router.add_post("/v1/rebuilds", start)
    app.router.add_get("/v1/rebuilds", index)
    app.router.add_get("/v1/rebuilds/{host}/{instance}", show)
    app.router.add_post("/v1/rebuilds/{host}/{instance}/abort", abort)
    verdicts = "|".join(DECISIONS)
    app.router.add_post(f"/v1/rebuilds/{{host}}/{{instance}}/{{verdict:{verdicts}}}", decide)
    app.router.add_get("/openapi.json", openapi)
    return app


def openapi_document() -> dict[str, Any]:
    """OpenAPI 3.1, its schemas taken from the same pydantic models the API validates with."""
    models: list[type[BaseModel]] = [
        StrictRebuildRequest, Started, RebuildDescription, RebuildSummary, StrictDecision, Sent,
        StrictAbortRequest, AbortAnswer, ErrorBody,
    ]  # fmt: skip
    schemas: dict[str, Any] = {}
    for model in models:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(schema.pop("$defs", {}))
        # The strict forms are what callers send; they keep the wire models' names.
        schemas[model.__name__.removeprefix("Strict")] = schema

    def ref(name: str) -> dict[str, Any]:
        return {"content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{name}"}}}}

    def answers(ok: int, name: str, *errors: int) -> dict[str, Any]:
        result: dict[str, Any] = {str(ok): {"description": "OK", **ref(name)}}
        for status in (401, *errors):
            result[str(status)] = {"description": "error", **ref("ErrorBody")}
        return result

    target = [
        {"name": "host", "in": "path", "required": True, "schema": {"type": "string"}},
        {"name": "instance", "in": "path", "required": True, "schema": {"type": "string"}},
    ]
    paths: dict[str, Any] = {
        "/v1/rebuilds": {
            "post": {"summary": "Start a rebuild", "requestBody": ref("RebuildRequest"),
                     "responses": answers(201, "Started", 400, 409)},
            "get": {"summary": "List rebuilds", "parameters": [
                {"name": n, "in": "query", "schema": {"type": "string"}}
                for n in ("phase", "host", "running", "limit")
            ], "responses": {"200": {"description": "OK", "content": {"application/json": {"schema": {
                "type": "array", "items": {"$ref": "#/components/schemas/RebuildSummary"}}}}},
                "401": {"description": "error", **ref("ErrorBody")}}},
        },
        "/v1/rebuilds/{host}/{instance}": {
            "get": {"summary": "A rebuild's status", "parameters": target,
                    "responses": answers(200, "RebuildDescription", 404)},
        },
        "/v1/rebuilds/{host}/{instance}/abort": {
            "post": {"summary": "Abort (answers whether it was accepted)", "parameters": target,
                     "requestBody": ref("AbortRequest"),
                     "responses": answers(200, "AbortAnswer", 400, 404, 409)},
        },
    }  # fmt: skip
    for verdict in DECISIONS:
        paths[f"/v1/rebuilds/{{host}}/{{instance}}/{verdict}"] = {
            "post": {"summary": f"Send {verdict}", "parameters": target, "requestBody": ref("Decision"),
                     "responses": answers(202, "Sent", 400, 404, 409)},
        }  # fmt: skip
    return {
        "openapi": "3.1.0",
        "info": {"title": "durable-rebuild API", "version": "1"},
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
        "paths": paths,
    }


app = typer.Typer(add_completion=False)


@app.command(epilog="Exit codes (every command):\n\n" + exit_code_table())
def run(
    listen: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8480,
    token_file: Annotated[
        Path | None, typer.Option(help="File holding the bearer token (else REBUILD_API_TOKEN).")
    ] = None,
    address: Annotated[str | None, typer.Option(help="Temporal address (default: envconfig).")] = None,
) -> None:
    """Serve the rebuild HTTP API. Every request needs `Authorization: Bearer TOKEN`."""
    token = token_file.read_text().strip() if token_file else os.environ.get("REBUILD_API_TOKEN", "")
    if not token:
        print("rebuild-api: no token: give --token-file or set REBUILD_API_TOKEN", file=sys.stderr)
        raise typer.Exit(ExitCode.BAD_INPUT)

    async def serve() -> None:
        client = await connect(address)
        runner = web.AppRunner(create_app(client, token))
        await runner.setup()
        await web.TCPSite(runner, listen, port).start()
        print(f"rebuild-api listening on http://{listen}:{port}", flush=True)
        await asyncio.Event().wait()

    try:
        asyncio.run(serve())
    except TemporalUnavailable as exc:
        print(f"rebuild-api: {exc}", file=sys.stderr, flush=True)
        os._exit(ExitCode.UNAVAILABLE)
    except KeyboardInterrupt:
        pass
    os._exit(ExitCode.OK)


def main() -> None:
    app()
