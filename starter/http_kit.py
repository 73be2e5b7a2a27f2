"""One small kit for both HTTP APIs (``/v1/rebuilds`` and ``/v1/fleets``): errors, replies, bodies,
query limits, the caller's name, and the words a refusal is said in.

Every answer that is not a success is ``ErrorBody`` JSON with its status, whatever raised it: a
service refusal (``starter.errors``: 400, 404, 409, in the API's own words, with the resource's path
where it helps), a body or query that cannot be used (400), a missing token (401), Temporal away (503).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from pydantic import BaseModel, ValidationError
from temporalio.client import Client
from temporalio.service import RPCError, RPCStatusCode

from common.connection import TemporalUnavailable
from starter.api_clients import ApiClient, ApiClients, Forbidden
from starter.errors import BadRequest, Conflict, NotFound, ServiceError, Words, validation_problems
from workflows.models import check_requested_by

CLIENT: web.AppKey[Client] = web.AppKey("client", Client)
REQUESTER: web.RequestKey[str] = web.RequestKey("requester", str)
CALLER: web.RequestKey[ApiClient] = web.RequestKey("caller", ApiClient)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Middleware = Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]
Model = TypeVar("Model", bound=BaseModel)
# Paths anyone may read: a load balancer's health check and the API's description.
PUBLIC_PATHS = frozenset({"/healthz", "/openapi.json"})
# Temporal answers a request in milliseconds; one that takes this long is not there.
REQUEST_TIMEOUT = 20.0
UNAVAILABLE_STATUSES = frozenset({RPCStatusCode.UNAVAILABLE, RPCStatusCode.DEADLINE_EXCEEDED})
STATUS_OF = {BadRequest: 400, NotFound: 404, Conflict: 409}
log = logging.getLogger("rebuild.api")


class ErrorBody(BaseModel):
    error: str
    status: int
    # What kind of refusal, for a program: the exception type's name where one was raised
    # (``Forbidden``, ``RebuildRunning``, ``ValidationError``), else the status's (``NotFound``).
    type: str


# An error's type where no exception names it.
STATUS_TYPES = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    405: "MethodNotAllowed",
    409: "Conflict",
    413: "PayloadTooLarge",
    429: "TooBusy",
    500: "InternalError",
    502: "TemporalRefused",
    503: "TemporalUnavailable",
}


class BadQuery(BadRequest):
    """A query parameter that cannot be used (``?limit=abc``)."""


def error(
    status: int, message: str, headers: dict[str, str] | None = None, kind: str | None = None
) -> web.Response:
    kind = kind or STATUS_TYPES.get(status, "Error")
    body = ErrorBody(error=message, status=status, type=kind).model_dump()
    return web.json_response(body, status=status, headers=headers)


def reply(model: BaseModel, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        text=model.model_dump_json(), status=status, content_type="application/json", headers=headers
    )


def query_cursor(request: web.Request) -> bytes | None:
    """``?cursor=`` as a list's ``Link: rel="next"`` gave it: Temporal's next-page token, base64url."""
    raw = request.query.get("cursor")
    if not raw:
        return None
    try:
        return base64.b64decode(raw + "=" * (-len(raw) % 4), altchars=b"-_", validate=True)
    except (ValueError, binascii.Error):
        raise BadQuery(f"cursor is not one this API gave: {raw[:40]!r}") from None


def with_next_page(request: web.Request, response: web.Response, cursor: bytes | None) -> web.Response:
    """A list's next page as RFC 8288 links it: ``Link: </v1/rebuilds?...&cursor=...>; rel="next"``."""
    if cursor:
        token = base64.urlsafe_b64encode(cursor).decode().rstrip("=")
        following = request.rel_url.update_query(cursor=token)
        response.headers["Link"] = f'<{following}>; rel="next"'
    return response


def reply_list(rows: Sequence[BaseModel]) -> web.Response:
    return web.json_response([row.model_dump(mode="json") for row in rows])


def answered(answer: BaseModel, accepted: bool) -> web.Response:
    """An update's answer (abort, pause, ...): 200 when it was accepted, 409 when refused."""
    return reply(answer, 200 if accepted else 409)


async def read_body(request: web.Request, model: type[Model], optional: bool = False) -> Model:
    """The body as ``model`` (strict models refuse unknown fields); an absent optional body is ``{}``."""
    if optional and not request.can_read_body:
        return model.model_validate({})
    try:
        payload = await request.json()
    except ValueError:
        raise BadRequest("the body must be JSON") from None
    return model.model_validate(payload)


async def read_json(request: web.Request) -> Any:
    """The body as JSON, for a handler that changes it before validating it (the admin password)."""
    try:
        return await request.json()
    except ValueError:
        raise BadRequest("the body must be JSON") from None


def query_int(request: web.Request, name: str, default: int, minimum: int, maximum: int | None) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    bounds = f"from {minimum} to {maximum}" if maximum is not None else f"{minimum} or more"
    try:
        value = int(raw)
    except ValueError:
        raise BadQuery(f"{name} must be a whole number {bounds}, not {raw!r}") from None
    if value < minimum or (maximum is not None and value > maximum):
        raise BadQuery(f"{name} must be {bounds}, not {value}")
    return value


def query_flag(request: web.Request, name: str) -> bool:
    """``?name=true`` or ``false`` (absent: false); anything else is refused, not read as false."""
    values = request.query.getall(name, [])
    if not values:
        return False
    if len(values) > 1 or values[0] not in ("true", "false"):
        raise BadQuery(f"{name} must be true or false, once, not {', '.join(map(repr, values))[:80]}")
    return values[0] == "true"


def caller(request: web.Request) -> ApiClient:
    """The authenticated client, with its scopes (``starter.api_clients``)."""
    return request[CALLER]


def requester(request: web.Request, claimed: str) -> str:
    """The authenticated client's name; a name the body gives is kept only as "on behalf of"."""
    name = request[REQUESTER]
    if claimed in ("unknown", name):
        return name
    return check_requested_by(f"{name} (for {claimed})")


# A refusal as an API caller reads it: where to look is a path, an input is a field of the body.
API_WORDS = Words(
    field=lambda name: f"the {name}",
    rebuild=lambda host, instance: f"GET /v1/rebuilds/{host}/{instance}",
    fleet=lambda name: f"GET /v1/fleets/{name}",
)


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
        client = clients.identify(request.headers.get("Authorization", ""))
        if client is None:
            return error(401, "missing or wrong bearer token", {"WWW-Authenticate": "Bearer"})
        request[REQUESTER] = client.name
        request[CALLER] = client
        return await handler(request)

    return check


@web.middleware
async def translate_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Refusals of the service layer and bad input, for every endpoint of both APIs."""
    try:
        return await handler(request)
    except Forbidden as exc:
        return error(403, f"forbidden: {exc}", kind="Forbidden")
    except ValidationError as exc:
        return error(400, f"invalid request: {validation_problems(exc)}", kind="ValidationError")
    except ServiceError as exc:
        status = next((code for kind, code in STATUS_OF.items() if isinstance(exc, kind)), 400)
        return error(status, exc.said_with(API_WORDS), kind=type(exc).__name__)
    except ValueError as exc:
        return error(400, str(exc), kind=type(exc).__name__)


def middlewares(clients: ApiClients) -> list[Middleware]:
    """In this order: JSON for every error, then the token, then the refusals' words."""
    return [json_errors, bearer_auth(clients), translate_errors]


class ClientAccessLogger(AbstractAccessLogger):
    """One line a request that names the client by its token's name, not only by its address:
    ``portal GET /v1/rebuilds/kvm-1/web-1 200 12.3 ms``. Health probes are not logged."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        if request.path in PUBLIC_PATHS and response.status < 400:
            return
        client = request.get(REQUESTER, "-")
        self.logger.info(
            "%s %s %s %d %.1f ms",
            client,
            request.method,
            request.path,
            response.status,
            time * 1000,
            extra={
                "client": client,
                "remote": request.remote,
                "method": request.method,
                "path": request.path,
                "status": response.status,
                "seconds": round(time, 6),
            },
        )
