"""``rebuild-api``: the HTTP API other services use to start, watch and steer rebuilds.

JSON in and out, with the workflow's own pydantic models (their strict forms: unknown fields and bad
values are refused here, at the edge); errors are JSON too: 400 bad input (including a host no worker
serves), 401 no or wrong bearer token (and nothing changes), 404 unknown rebuild, 409 already running /
not running. The process's exit codes are the CLI's (``common.exit_codes``).

This module is the process: the application put together, TLS, serving. The endpoints:
``starter/rebuild_api.py`` (``/v1/rebuilds``), ``starter/fleet_api.py`` (``/v1/fleets``), and here
``/healthz`` and ``/openapi.json``; what they share (errors, replies, bodies, limits, the caller's
token) is ``starter/http_kit.py``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import ssl
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from aiohttp import web
from pydantic import BaseModel
from temporalio.client import Client
from temporalio.service import RPCError

from common.config_file import run_with_config
from common.connection import TemporalUnavailable, connect
from common.exit_codes import ExitCode
from common.exit_codes import table as exit_code_table
from common.help import HelpCommand
from common.logs import LogFormat, LogLevel, configure_logging
from common.systemd import notify
from starter.api_clients import ApiClients, TokensFileError
from starter.fleet_api import add_fleet_routes
from starter.http_kit import (
    CLIENT,
    ClientAccessLogger,
    ErrorBody,
    error,
    log,
    middlewares,
    reply,
)
from starter.instances_api import add_instance_routes
from starter.openapi import Op, document, route
from starter.rebuild_api import STATUS_TTL_SECONDS, add_rebuild_routes
from starter.snapshot_api import add_snapshot_routes

CLIENTS: web.AppKey[ApiClients] = web.AppKey("clients", ApiClients)
HEALTH_TIMEOUT = 3.0


class Health(BaseModel):
    status: str
    temporal: str


def create_app(
    client: Client, clients: ApiClients, status_ttl: float = STATUS_TTL_SECONDS
) -> web.Application:
    app = web.Application(middlewares=middlewares(clients))  # type: ignore[arg-type]
    app[CLIENT] = client
    app[CLIENTS] = clients
    route(
        app,
        "GET",
        "/healthz",
        healthz,
        Op(
            "getHealth",
            "service",
            "Liveness and Temporal's reachability (no token needed)",
            200,
            Health,
            errors=(503,),
            public=True,
        ),
    )
    add_rebuild_routes(app, client, status_ttl)
    route(app, "GET", "/openapi.json", openapi, Op(
        "getOpenApi", "service", "This document", 200, {"type": "object"}, public=True))  # fmt: skip
    add_fleet_routes(app)
    add_snapshot_routes(app)
    add_instance_routes(app)
    return app


async def healthz(request: web.Request) -> web.Response:
    """Unauthenticated: 200 when Temporal answers its health check, else 503 (JSON either way)."""
    try:
        healthy = await asyncio.wait_for(request.app[CLIENT].service_client.check_health(), HEALTH_TIMEOUT)
    except (RPCError, RuntimeError, TimeoutError) as exc:
        return error(503, f"Temporal is unavailable: {str(exc) or 'no answer in time'}")
    if not healthy:
        return error(503, "Temporal answers but reports itself unhealthy")
    return reply(Health(status="ok", temporal="serving"))


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(openapi_document(request.app))


TAGS = [
    {"name": "rebuilds", "description": "Start, list and watch rebuilds"},
    {"name": "decisions", "description": "Steer a running rebuild: approve, confirm, revert, abort"},
    {"name": "fleets", "description": "Rolling rebuilds of many instances"},
    {"name": "snapshots", "description": "Snapshot instances while they run, to rebuild from later"},
    {"name": "instances", "description": "Every host's instances, as each host's worker lists them"},
    {"name": "service", "description": "Health and this description"},
]


def openapi_document(app: web.Application) -> dict[str, Any]:
    """OpenAPI 3.1, from the routes ``app`` serves and the pydantic models they validate with."""
    return document(app, {"title": "durable-rebuild API", "version": "1"}, TAGS, ErrorBody)


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


def _loopback(listen: str) -> bool:
    try:
        return ipaddress.ip_address(listen).is_loopback
    except ValueError:
        return listen == "localhost"


app = typer.Typer(add_completion=False)


@app.command(cls=HelpCommand, epilog="Exit codes (every command):\n\n" + exit_code_table())
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
    address: Annotated[
        str | None, typer.Option(envvar="TEMPORAL_ADDRESS", help="Temporal address (default: envconfig).")
    ] = None,
    log_format: Annotated[
        LogFormat, typer.Option(envvar="REBUILD_LOG_FORMAT", help="Log lines.")
    ] = LogFormat.TEXT,
    log_level: Annotated[
        LogLevel, typer.Option(envvar="REBUILD_LOG_LEVEL", help="The least severe level logged.")
    ] = LogLevel.INFO,
    config_file: Annotated[
        Path | None,
        typer.Option(
            "--config",
            envvar="REBUILD_API_CONFIG",
            help="A TOML file of these options, named as here without the dashes (state-dir = "
            '"/srv/rebuild"); the command line and the environment win over it.',
        ),
    ] = None,
) -> None:
    """Serve the rebuild HTTP API. Every request but /healthz and /openapi.json needs a client's token."""
    del config_file  # read before the options were parsed: its settings are their defaults
    configure_logging(log_format, log_level)
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
        runner = web.AppRunner(
            create_app(client, clients),
            access_log=logging.getLogger("rebuild.api.access"),
            access_log_class=ClientAccessLogger,
        )
        await runner.setup()
        await web.TCPSite(runner, listen, port, ssl_context=context).start()
        scheme = "https" if context else "http"
        log.info("rebuild-api listening on %s://%s:%d", scheme, listen, port,
                 extra={"clients": clients.names()})  # fmt: skip
        for name in clients.legacy_names():
            log.warning(
                "client %s has no scopes (a NAME TOKEN line): it may touch every host and "
                "instance with every verb but self-approve; give it hosts= instances= verbs=",
                name,
            )
        if context is None and not _loopback(listen):
            log.warning(
                "serving plain HTTP on %s, not a loopback address: tokens and admin passwords "
                "cross the network in clear; give --tls-cert and --tls-key",
                listen,
            )
        notify("READY=1", f"STATUS=listening on {scheme}://{listen}:{port}")
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
    run_with_config(app, "rebuild-api", "REBUILD_API_CONFIG")


if __name__ == "__main__":
    main()
