"""``rebuild-api``: the HTTP API other services use to start, watch and steer rebuilds.

JSON in and out, with the workflow's own pydantic models (their strict forms: unknown fields and bad
values are refused here, at the edge); errors are JSON too: 400 bad input (including a host no worker
serves), 401 no or wrong bearer token (and nothing changes), 404 unknown rebuild, 409 already running /
not running. The process's exit codes are the CLI's (``common.exit_codes``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from aiohttp import web
from pydantic import BaseModel, ValidationError
from temporalio.client import Client
from temporalio.service import RPCError, RPCStatusCode

from common.connection import TemporalUnavailable, connect
from common.exit_codes import ExitCode
from common.exit_codes import table as exit_code_table
from common.logs import LogFormat, configure_logging
from starter.api_clients import ApiClients, TokensFileError
from starter.errors import (
    BadFilter,
    NoWorkerOnHost,
    RebuildAlreadyRunning,
    RebuildNotRunning,
    ServiceError,
    UnknownRebuild,
    validation_problems,
)
from starter.fleet_api import FLEET_MODELS, add_fleet_routes, fleet_openapi_paths
from starter.identity_options import hash_password
from starter.rebuilds import (
    DECISIONS,
    RebuildDescription,
    RebuildSummary,
    abort_rebuild,
    describe_rebuild,
    list_query,
    list_rebuilds,
    send_decision,
    start_rebuild,
)
from starter.status_cache import StatusCache
from workflows.models import (
    AbortAnswer,
    StrictAbortRequest,
    StrictDecision,
    StrictRebuildRequest,
    check_requested_by,
)

CLIENT: web.AppKey[Client] = web.AppKey("client", Client)
CLIENTS: web.AppKey[ApiClients] = web.AppKey("clients", ApiClients)
STATUS: web.AppKey[StatusCache[RebuildDescription]] = web.AppKey("status", StatusCache)
# How old a status answer may be: pollers of one rebuild share one trip to Temporal per this long.
STATUS_TTL_SECONDS = 1.0
REQUESTER: web.RequestKey[str] = web.RequestKey("requester", str)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Middleware = Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]
MAX_LIST_LIMIT = 1000
# Paths anyone may read: a load balancer's health check and the API's description.
PUBLIC_PATHS = frozenset({"/healthz", "/openapi.json"})
# Temporal answers a request in milliseconds; one that takes this long is not there.
REQUEST_TIMEOUT = 20.0
HEALTH_TIMEOUT = 3.0
UNAVAILABLE_STATUSES = frozenset({RPCStatusCode.UNAVAILABLE, RPCStatusCode.DEADLINE_EXCEEDED})
log = logging.getLogger("rebuild.api")


class Started(BaseModel):
    workflow_id: str
    run_id: str | None


class Sent(BaseModel):
    workflow_id: str
    signal: str


class Health(BaseModel):
    status: str
    temporal: str


class ErrorBody(BaseModel):
    error: str
    status: int


class BadQuery(ValueError):
    """A query parameter that cannot be used (``?limit=abc``)."""


def error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    body = ErrorBody(error=message, status=status).model_dump()
    return web.json_response(body, status=status, headers=headers)


def reply(model: BaseModel, status: int = 200) -> web.Response:
    return web.Response(text=model.model_dump_json(), status=status, content_type="application/json")


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every answer but a success is JSON with its status, aiohttp's own 404 and 405 included."""
    try:
        async with asyncio.timeout(REQUEST_TIMEOUT):
            return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        allow = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        return error(exc.status, exc.reason.lower(), allow)
    except (TimeoutError, TemporalUnavailable) as exc:
        return error(503, f"Temporal is unavailable: {str(exc) or 'no answer in time'}")
    except RPCError as exc:
        if exc.status in UNAVAILABLE_STATUSES:
            return error(503, f"Temporal is unavailable: {exc.message}")
        log.exception("Temporal refused %s %s", request.method, request.path)
        return error(502, f"Temporal refused the call: {exc.message}")
    except Exception:
        log.exception("failed: %s %s", request.method, request.path)
        return error(500, "internal error; the API's log has the details")


def bearer_auth(clients: ApiClients) -> Middleware:
    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in PUBLIC_PATHS:
            return await handler(request)
        name = clients.identify(request.headers.get("Authorization", ""))
        if name is None:
            return error(401, "missing or wrong bearer token", {"WWW-Authenticate": "Bearer"})
        request[REQUESTER] = name
        return await handler(request)

    return check


@web.middleware
async def translate_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ValidationError as exc:
        problems = validation_problems(exc)
        return error(400, f"invalid request: {problems}")
    except UnknownRebuild as exc:
        return error(404, str(exc))
    except (RebuildAlreadyRunning, RebuildNotRunning) as exc:
        return error(409, str(exc))
    except (BadFilter, NoWorkerOnHost, ServiceError, ValueError) as exc:
        return error(400, str(exc))


def requester(request: web.Request, claimed: str) -> str:
    """The authenticated client's name; a name the body gives is kept only as "on behalf of"."""
    name = request[REQUESTER]
    if claimed in ("unknown", name):
        return name
    return check_requested_by(f"{name} (for {claimed})")


def list_limit(raw: str | None) -> int:
    if raw is None:
        return 50
    try:
        limit = int(raw)
    except ValueError:
        raise BadQuery(f"limit must be a whole number from 1 to {MAX_LIST_LIMIT}, not {raw!r}") from None
    if not 1 <= limit <= MAX_LIST_LIMIT:
        raise BadQuery(f"limit must be from 1 to {MAX_LIST_LIMIT}, not {limit}")
    return limit


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
    rebuild = rebuild.model_copy(update={"requested_by": requester(request, rebuild.requested_by)})
    handle = await start_rebuild(request.app[CLIENT], rebuild)
    request.app[STATUS].forget(rebuild.host, rebuild.instance)
    return reply(Started(workflow_id=handle.id, run_id=handle.result_run_id), status=201)


async def show(request: web.Request) -> web.Response:
    host, instance = request.match_info["host"], request.match_info["instance"]
    return reply(await request.app[STATUS].get(host, instance))


async def index(request: web.Request) -> web.Response:
    query = list_query(
        request.query.get("phase"), request.query.get("host"), request.query.get("running") == "true"
    )
    rows = await list_rebuilds(request.app[CLIENT], query, list_limit(request.query.get("limit")))
    return web.json_response([row.model_dump() for row in rows])


async def decide(request: web.Request) -> web.Response:
    host, instance, verdict = (request.match_info[k] for k in ("host", "instance", "verdict"))
    decision = StrictDecision.model_validate(await body(request) if request.can_read_body else {})
    decision = decision.model_copy(update={"requested_by": requester(request, decision.requested_by)})
    workflow_id = await send_decision(request.app[CLIENT], instance, host, verdict, decision)
    request.app[STATUS].forget(host, instance)
    return reply(Sent(workflow_id=workflow_id, signal=verdict), status=202)


async def abort(request: web.Request) -> web.Response:
    host, instance = request.match_info["host"], request.match_info["instance"]
    wanted = StrictAbortRequest.model_validate(await body(request))
    wanted = wanted.model_copy(update={"requested_by": requester(request, wanted.requested_by)})
    answer = await abort_rebuild(request.app[CLIENT], instance, host, wanted)
    request.app[STATUS].forget(host, instance)
    return reply(answer, status=200 if answer.accepted else 409)


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(openapi_document())


async def healthz(request: web.Request) -> web.Response:
    """Unauthenticated: 200 when Temporal answers its health check, else 503 (JSON either way)."""
    try:
        healthy = await asyncio.wait_for(request.app[CLIENT].service_client.check_health(), HEALTH_TIMEOUT)
    except (RPCError, RuntimeError, TimeoutError) as exc:
        return error(503, f"Temporal is unavailable: {str(exc) or 'no answer in time'}")
    if not healthy:
        return error(503, "Temporal answers but reports itself unhealthy")
    return reply(Health(status="ok", temporal="serving"))


def create_app(
    client: Client, clients: ApiClients, status_ttl: float = STATUS_TTL_SECONDS
) -> web.Application:
    middlewares = [json_errors, bearer_auth(clients), translate_errors]
    app = web.Application(middlewares=middlewares)  # type: ignore[arg-type]
    app[CLIENT] = client
    app[CLIENTS] = clients

    async def describe(host: str, instance: str) -> RebuildDescription:
        return await describe_rebuild(client, instance, host)

    app[STATUS] = StatusCache(describe, status_ttl)
    app.router.add_get("/healthz", healthz)
    app.router.add_post("/v1/rebuilds", start)
    app.router.add_get("/v1/rebuilds", index)
    app.router.add_get("/v1/rebuilds/{host}/{instance}", show)
    app.router.add_post("/v1/rebuilds/{host}/{instance}/abort", abort)
    verdicts = "|".join(DECISIONS)
    app.router.add_post(f"/v1/rebuilds/{{host}}/{{instance}}/{{verdict:{verdicts}}}", decide)
    app.router.add_get("/openapi.json", openapi)
    add_fleet_routes(app, CLIENT, requester)
    return app


def openapi_document() -> dict[str, Any]:
    """OpenAPI 3.1, its schemas taken from the same pydantic models the API validates with."""
    models: list[type[BaseModel]] = [
        StrictRebuildRequest, Started, RebuildDescription, RebuildSummary, StrictDecision, Sent,
        StrictAbortRequest, AbortAnswer, ErrorBody, Health, *FLEET_MODELS,
    ]  # fmt: skip
    schemas: dict[str, Any] = {}
    for model in models:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(schema.pop("$defs", {}))
        # The strict forms are what callers send; they keep the wire models' names.
        schemas[model.__name__.removeprefix("Strict")] = schema

    def ref(name: str) -> dict[str, Any]:
        return {"content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{name}"}}}}

    reasons = {
        400: "bad input: the message names the field and why",
        401: "no or wrong bearer token; nothing changed",
        404: "no rebuild of that instance is known",
        409: "a rebuild is already running, none is running, or the abort was refused",
        503: "Temporal is unavailable",
    }

    def answers(ok: int, name: str, *errors: int, schema: dict[str, Any] | None = None) -> dict[str, Any]:
        body = {"content": {"application/json": {"schema": schema}}} if schema else ref(name)
        result: dict[str, Any] = {str(ok): {"description": name, **body}}
        for status in sorted({401, 503, *errors}):
            result[str(status)] = {"description": reasons[status], **ref("ErrorBody")}
        return result

    target = [
        {"name": "host", "in": "path", "required": True, "schema": {"type": "string"}},
        {"name": "instance", "in": "path", "required": True, "schema": {"type": "string"}},
    ]
    filters = [
        {"name": "phase", "in": "query", "schema": {"type": "string"}},
        {"name": "host", "in": "query", "schema": {"type": "string"}},
        {"name": "running", "in": "query", "schema": {"type": "boolean"}},
        {"name": "limit", "in": "query",
         "schema": {"type": "integer", "minimum": 1, "maximum": MAX_LIST_LIMIT, "default": 50}},
    ]  # fmt: skip
    listing = {"type": "array", "items": {"$ref": "#/components/schemas/RebuildSummary"}}
    paths: dict[str, Any] = {
        "/v1/rebuilds": {
            "post": {"operationId": "startRebuild", "tags": ["rebuilds"], "summary": "Start a rebuild",
                     "requestBody": {"required": True, **ref("RebuildRequest")},
                     "responses": answers(201, "Started", 400, 409)},
            "get": {"operationId": "listRebuilds", "tags": ["rebuilds"], "summary": "List rebuilds",
                    "parameters": filters,
                    "responses": answers(200, "RebuildSummary list", 400, schema=listing)},
        },
        "/v1/rebuilds/{host}/{instance}": {
            "get": {"operationId": "getRebuild", "tags": ["rebuilds"], "summary": "A rebuild's status",
                    "parameters": target, "responses": answers(200, "RebuildDescription", 404)},
        },
        "/v1/rebuilds/{host}/{instance}/abort": {
            "post": {"operationId": "abortRebuild", "tags": ["decisions"],
                     "summary": "Abort (answers whether it was accepted)", "parameters": target,
                     "requestBody": {"required": True, **ref("AbortRequest")},
                     "responses": answers(200, "AbortAnswer", 400, 404, 409)},
        },
        "/healthz": {
            "get": {"operationId": "getHealth", "tags": ["service"], "security": [],
                    "summary": "Liveness and Temporal's reachability (no token needed)",
                    "responses": {"200": {"description": "Health", **ref("Health")},
                                  "503": {"description": reasons[503], **ref("ErrorBody")}}},
        },
        "/openapi.json": {
            "get": {"operationId": "getOpenApi", "tags": ["service"], "security": [],
                    "summary": "This document",
                    "responses": {"200": {"description": "OpenAPI 3.1 document",
                                          "content": {"application/json": {"schema": {"type": "object"}}}}}},
        },
    }  # fmt: skip
    for verdict in DECISIONS:
        paths[f"/v1/rebuilds/{{host}}/{{instance}}/{verdict}"] = {
            "post": {"operationId": f"{verdict}Rebuild", "tags": ["decisions"], "summary": f"Send {verdict}",
                     "parameters": target, "requestBody": {"required": False, **ref("Decision")},
                     "responses": answers(202, "Sent", 400, 404, 409)},
        }  # fmt: skip
    paths.update(fleet_openapi_paths(ref, answers))
    return {
        "openapi": "3.1.0",
        "info": {"title": "durable-rebuild API", "version": "1"},
        "tags": [
            {"name": "rebuilds", "description": "Start, list and watch rebuilds"},
            {"name": "decisions", "description": "Steer a running rebuild: approve, confirm, revert, abort"},
            {"name": "service", "description": "Health and this description"},
        ],
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
        "paths": paths,
    }


def tls_context(cert: Path, key: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    return context


def _credential(name: str) -> Path | None:
    """A file systemd passed with ``LoadCredential=NAME:...``, when it did."""
    directory = os.environ.get("CREDENTIALS_DIRECTORY")
    path = Path(directory, name) if directory else None
    return path if path is not None and path.exists() else None


app = typer.Typer(add_completion=False)


@app.command(epilog="Exit codes (every command):\n\n" + exit_code_table())
def run(
    listen: Annotated[
        str, typer.Option(envvar="REBUILD_API_LISTEN", help="Address to listen on.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(envvar="REBUILD_API_PORT", help="Port to listen on.")] = 8480,
    tokens_file: Annotated[
        Path | None,
        typer.Option(
            "--tokens-file",
            envvar="REBUILD_API_TOKENS_FILE",
            help="One client a line: NAME TOKEN (default: $CREDENTIALS_DIRECTORY/api-tokens).",
        ),
    ] = None,
    tls_cert: Annotated[
        Path | None,
        typer.Option(envvar="REBUILD_API_TLS_CERT", help="TLS certificate chain (PEM); serves HTTPS."),
    ] = None,
    tls_key: Annotated[
        Path | None, typer.Option(envvar="REBUILD_API_TLS_KEY", help="TLS private key (PEM).")
    ] = None,
    address: Annotated[str | None, typer.Option(help="Temporal address (default: envconfig).")] = None,
    log_format: Annotated[
        LogFormat, typer.Option(envvar="REBUILD_LOG_FORMAT", help="Log lines.")
    ] = LogFormat.TEXT,
) -> None:
    """Serve the rebuild HTTP API. Every request but /healthz and /openapi.json needs a client's token."""
    configure_logging(log_format)
    tokens_file = tokens_file or _credential("api-tokens")
    tls_cert = tls_cert or _credential("api-tls.crt")
    tls_key = tls_key or _credential("api-tls.key")
    try:
        if tokens_file is None:
            raise TokensFileError("no tokens file: give --tokens-file or load the credential api-tokens")
        clients = ApiClients.load(tokens_file)
        if (tls_cert is None) != (tls_key is None):
            raise ValueError("TLS needs both --tls-cert and --tls-key")
        context = tls_context(tls_cert, tls_key) if tls_cert and tls_key else None
    except (ValueError, OSError, ssl.SSLError) as exc:
        print(f"rebuild-api: {exc}", file=sys.stderr, flush=True)
        os._exit(ExitCode.BAD_INPUT)

    async def serve() -> None:
        client = await connect(address)
        runner = web.AppRunner(create_app(client, clients), access_log=log)
        await runner.setup()
        await web.TCPSite(runner, listen, port, ssl_context=context).start()
        scheme = "https" if context else "http"
        log.info("rebuild-api listening on %s://%s:%d", scheme, listen, port,
                 extra={"clients": sorted(clients.by_token.values())})  # fmt: skip
        await asyncio.Event().wait()

    try:
        asyncio.run(serve())
    except TemporalUnavailable as exc:
        log.error("rebuild-api: %s", exc)
        os._exit(ExitCode.UNAVAILABLE)
    except KeyboardInterrupt:
        pass
    os._exit(ExitCode.OK)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
