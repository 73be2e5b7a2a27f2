"""The OpenAPI 3.1 document, made from the routes as they are registered: one place says what an
endpoint takes and answers, and the same place adds it to the router.

Each route is added with :func:`route` and an :class:`Op` (its operation ID, tag, summary, the
pydantic models of its body and its answer, its query parameters and its errors); the document's
paths and path parameters come from the router's own paths, its schemas from the same pydantic models
the handlers validate with. A route added without an ``Op`` is not served at all: :func:`document`
fails on one, so nothing is served undocumented.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from pydantic import BaseModel

# What each error status means, as the document says it.
ERROR_MEANINGS = {
    400: "bad input: the message names the field and why",
    401: "no or wrong bearer token; nothing changed",
    403: "the token's scopes do not cover this host, instance or verb; nothing changed",
    404: "no rebuild of that instance is known",
    409: "a rebuild is already running, none is running, or the abort was refused",
    429: "too many requests of this kind at once; try again after Retry-After seconds",
    503: "Temporal is unavailable",
}
_PATH_PARAMETER = re.compile(r"\{(?P<name>\w+)(?::(?P<pattern>[^}]+))?\}")
_ALTERNATIVES = re.compile(r"^[\w-]+(\|[\w-]+)*$")


@dataclass(frozen=True)
class Param:
    """A query parameter."""

    name: str
    type: str = "string"
    description: str | None = None
    minimum: int | None = None
    maximum: int | None = None
    default: Any = None

    def described(self) -> dict[str, Any]:
        schema: dict[str, Any] = {"type": self.type}
        for key in ("minimum", "maximum", "default"):
            if getattr(self, key) is not None:
                schema[key] = getattr(self, key)
        found: dict[str, Any] = {"name": self.name, "in": "query", "schema": schema}
        if self.description:
            found["description"] = self.description
        return found


@dataclass(frozen=True)
class Op:
    """What one route takes and answers."""

    operation_id: str
    tag: str
    summary: str
    ok: int
    # The answer's model (a list of them where ``many``), or a raw JSON schema for a free-form one.
    answer: type[BaseModel] | dict[str, Any]
    many: bool = False
    errors: tuple[int, ...] = ()
    body: type[BaseModel] | None = None
    body_required: bool = True
    query: tuple[Param, ...] = ()
    # Headers of the success, by name: what each says.
    headers: dict[str, str] = field(default_factory=dict)
    # Anyone may call it: no token, so no 401 or 403 either.
    public: bool = False


ROUTES: web.AppKey[list[tuple[str, str, Op]]] = web.AppKey("openapi_routes", list)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def route(app: web.Application, method: str, path: str, handler: Handler, op: Op) -> None:
    """Serve ``handler`` at ``method path``, described by ``op``."""
    app.router.add_route(method, path, handler)
    app.setdefault(ROUTES, []).append((method.lower(), path, op))


def schema_name(model: type[BaseModel]) -> str:
    """The strict forms are what callers send; they keep the wire models' names."""
    return model.__name__.removeprefix("Strict")


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{schema_name(model)}"}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"content": {"application/json": {"schema": schema}}}


def document(
    app: web.Application, info: dict[str, Any], tags: list[dict[str, str]], error_model: type[BaseModel]
) -> dict[str, Any]:
    """The document of every route ``app`` serves."""
    described = app.get(ROUTES, [])
    documented = {(method, path) for method, path, _ in described}
    for resource in app.router.resources():
        for served in resource:
            key = (served.method.lower(), resource.canonical)
            if served.method not in ("HEAD", "OPTIONS") and not any(
                method == key[0] and _openapi_path(path)[0] == _openapi_path(resource.canonical)[0]
                for method, path in documented
            ):
                raise ValueError(f"{served.method} {resource.canonical} is served without an Op")
    models: dict[str, type[BaseModel]] = {schema_name(error_model): error_model}
    paths: dict[str, Any] = {}
    for method, path, op in described:
        shown, parameters = _openapi_path(path)
        for model in (op.body, op.answer):
            if isinstance(model, type):
                models[schema_name(model)] = model
        paths.setdefault(shown, {})[method] = _operation(op, parameters, error_model)
    schemas: dict[str, Any] = {}
    for name, model in models.items():
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(schema.pop("$defs", {}))
        schemas[name] = schema
    return {
        "openapi": "3.1.0",
        "info": info,
        "tags": tags,
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
        "paths": paths,
    }


def _openapi_path(path: str) -> tuple[str, list[dict[str, Any]]]:
    """aiohttp's ``{name}`` and ``{name:regex}`` as OpenAPI's ``{name}``, with their parameters."""
    parameters = []
    for found in _PATH_PARAMETER.finditer(path):
        schema: dict[str, Any] = {"type": "string"}
        pattern = found["pattern"]
        if pattern and _ALTERNATIVES.match(pattern):
            schema["enum"] = pattern.split("|")
        elif pattern:
            schema["pattern"] = f"^{pattern}$"
        parameters.append({"name": found["name"], "in": "path", "required": True, "schema": schema})
    return _PATH_PARAMETER.sub(lambda m: "{" + m["name"] + "}", path), parameters


def _operation(op: Op, path_parameters: list[dict[str, Any]], error_model: type[BaseModel]) -> dict[str, Any]:
    if isinstance(op.answer, dict):
        answer_schema = op.answer
    else:
        answer_schema = {"type": "array", "items": _ref(op.answer)} if op.many else _ref(op.answer)
    name = op.answer.__name__ if isinstance(op.answer, type) else "answer"
    success: dict[str, Any] = {"description": f"{name} list" if op.many else name, **_json(answer_schema)}
    if op.headers:
        success["headers"] = {
            name: {"description": says, "schema": {"type": "string"}} for name, says in op.headers.items()
        }
    responses: dict[str, Any] = {str(op.ok): success}
    always: set[int] = set() if op.public else {401, 403, 503}
    for status in sorted(always | set(op.errors)):
        responses[str(status)] = {"description": ERROR_MEANINGS[status], **_json(_ref(error_model))}
    operation: dict[str, Any] = {"operationId": op.operation_id, "tags": [op.tag], "summary": op.summary}
    parameters = path_parameters + [p.described() for p in op.query]
    if parameters:
        operation["parameters"] = parameters
    if op.body is not None:
        operation["requestBody"] = {"required": op.body_required, **_json(_ref(op.body))}
    if op.public:
        operation["security"] = []
    operation["responses"] = responses
    return operation
