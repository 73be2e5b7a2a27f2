"""The OpenAPI document is made from the routes as registered (``starter/openapi.py``)."""

from __future__ import annotations

import pytest
from aiohttp import web
from pydantic import BaseModel

from starter.openapi import Op, Param, document, route


class Thing(BaseModel):
    name: str


class Problem(BaseModel):
    error: str


async def handler(request: web.Request) -> web.Response:
    return web.json_response({})


def test_a_route_and_its_op_become_one_operation_with_its_parameters_and_schemas() -> None:
    app = web.Application()
    op = Op("getThing", "things", "A thing", 200, Thing, errors=(404,), query=(Param("limit", "integer"),))
    route(app, "GET", "/v1/things/{kind:red|blue}/{name}", handler, op)
    made = document(app, {"title": "t", "version": "1"}, [], Problem)
    operation = made["paths"]["/v1/things/{kind}/{name}"]["get"]
    assert [(p["name"], p["in"]) for p in operation["parameters"]] == [
        ("kind", "path"), ("name", "path"), ("limit", "query")
    ]  # fmt: skip
    assert operation["parameters"][0]["schema"]["enum"] == ["red", "blue"]
    assert set(operation["responses"]) == {"200", "401", "403", "404", "503"}
    assert set(made["components"]["schemas"]) == {"Thing", "Problem"}


def test_a_route_served_without_an_op_is_refused() -> None:
    app = web.Application()
    route(app, "GET", "/v1/things", handler, Op("listThings", "things", "Things", 200, Thing, many=True))
    app.router.add_post("/v1/things", handler)
    with pytest.raises(ValueError, match="POST /v1/things is served without an Op"):
        document(app, {"title": "t", "version": "1"}, [], Problem)
