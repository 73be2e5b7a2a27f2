"""The HTTP API with aiohttp's test client, against the real dev server and a fake host."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from temporalio.client import Client

from starter.api import create_app, openapi_document
from tests.fake_host import FakeHost
from workflows.models import rebuild_workflow_id

TOKEN = "s3cret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
async def api(client: Client) -> AsyncIterator[TestClient[Any, Any]]:
    test_client = TestClient(TestServer(create_app(client, TOKEN)))
    await test_client.start_server()
    yield test_client
    await test_client.close()


def start_body(host: str, instance: str = "vm-1", **extra: Any) -> dict[str, Any]:
    return {"instance": instance, "host": host, "image_url": "http://images.invalid/b.qcow2", **extra}


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}])
async def test_requests_without_the_token_get_401_and_change_nothing(
    api: TestClient[Any, Any], client: Client, unique_host: str, headers: dict[str, str]
) -> None:
    response = await api.post("/v1/rebuilds", json=start_body(unique_host), headers=headers)
    assert response.status == 401
    assert (await response.json())["error"] == "missing or wrong bearer token"
    assert (await api.get(f"/v1/rebuilds/{unique_host}/vm-1", headers=AUTH)).status == 404


async def test_start_status_approve_and_finish(
    api: TestClient[Any, Any], client: Client, unique_host: str, fake_host: FakeHost
) -> None:
    started = await api.post(
        "/v1/rebuilds", json=start_body(unique_host, require_approval=True), headers=AUTH
    )
    assert started.status == 201
    assert (await started.json())["workflow_id"] == rebuild_workflow_id(unique_host, "vm-1")

    again = await api.post("/v1/rebuilds", json=start_body(unique_host), headers=AUTH)
    assert again.status == 409
    assert "already running" in (await again.json())["error"]

    for _ in range(100):
        shown = await (await api.get(f"/v1/rebuilds/{unique_host}/vm-1", headers=AUTH)).json()
        if shown["status"] and shown["status"]["phase"] == "await-approval":
            break
        await asyncio.sleep(0.05)
    assert shown["workflow_status"] == "RUNNING"
    assert shown["status"]["phase"] == "await-approval"

    listed = await api.get("/v1/rebuilds", params={"host": unique_host, "running": "true"}, headers=AUTH)
    assert listed.status == 200

    approved = await api.post(
        f"/v1/rebuilds/{unique_host}/vm-1/approve", json={"requested_by": "ci"}, headers=AUTH
    )
    assert approved.status == 202
    result = await client.get_workflow_handle(rebuild_workflow_id(unique_host, "vm-1")).result()
    assert result["outcome"] == "rebuilt"

    late = await api.post(f"/v1/rebuilds/{unique_host}/vm-1/abort", json={"reason": "late"}, headers=AUTH)
    assert late.status == 409
    assert "is running" in (await late.json())["error"]


async def test_abort_answers_whether_it_was_accepted(
    api: TestClient[Any, Any], unique_host: str, fake_host: FakeHost
) -> None:
    await api.post("/v1/rebuilds", json=start_body(unique_host, require_approval=True), headers=AUTH)
    aborted = await api.post(
        f"/v1/rebuilds/{unique_host}/vm-1/abort", json={"reason": "changed plans"}, headers=AUTH
    )
    assert aborted.status == 200
    answer = await aborted.json()
    assert answer["accepted"] is True


@pytest.mark.parametrize(
    ("payload", "fragment"),
    [
        ({"instance": "vm-1", "host": "h", "image_url": "ftp://x/y"}, "image URL must be"),
        ({"instance": "vm-1", "host": "h", "image_url": "http://x/y", "sha256": "zz"}, "sha256 must be"),
        ({"instance": "vm-1", "host": "h"}, "exactly one of"),
        ({"instance": "vm-1", "host": "h", "image_url": "http://x/y", "bogus": 1}, "bogus"),
    ],
)
async def test_bad_input_is_400_with_a_reason(
    api: TestClient[Any, Any], payload: dict[str, Any], fragment: str
) -> None:
    response = await api.post("/v1/rebuilds", json=payload, headers=AUTH)
    assert response.status == 400
    assert fragment in (await response.json())["error"]


async def test_not_json_and_bad_filters_are_400(api: TestClient[Any, Any]) -> None:
    response = await api.post("/v1/rebuilds", data=b"not json", headers=AUTH)
    assert response.status == 400
    listed = await api.get("/v1/rebuilds", params={"phase": "x' OR 1=1"}, headers=AUTH)
    assert listed.status == 400


async def test_openapi_describes_every_route(api: TestClient[Any, Any]) -> None:
    response = await api.get("/openapi.json")
    assert response.status == 200
    document = await response.json()
    assert document == openapi_document()
    routes = {
        (resource.canonical, route.method)
        for resource in api.app.router.resources()
        for route in resource
        if route.method != "HEAD"
    }
    documented = {(path, method.upper()) for path, ops in document["paths"].items() for method in ops}
    served = {(path.replace("{verdict}", v), m) for path, m in routes for v in
              (["approve", "confirm", "revert"] if "{verdict}" in path else [""])}  # fmt: skip
    served = {(p, m) for p, m in served if p != "/openapi.json"}
    assert served == documented
    assert "RebuildRequest" in document["components"]["schemas"]


async def test_a_host_nobody_serves_is_400_and_nothing_starts(
    api: TestClient[Any, Any], client: Client, unique_host: str
) -> None:
    response = await api.post("/v1/rebuilds", json=start_body(unique_host), headers=AUTH)
    assert response.status == 400
    assert f"no worker polls rebuild-host-{unique_host}" in (await response.json())["error"]
    assert (await api.get(f"/v1/rebuilds/{unique_host}/vm-1", headers=AUTH)).status == 404


async def test_a_decision_with_a_reason_too_long_is_400(
    api: TestClient[Any, Any], unique_host: str, fake_host: FakeHost
) -> None:
    await api.post("/v1/rebuilds", json=start_body(unique_host, require_approval=True), headers=AUTH)
    too_long = await api.post(
        f"/v1/rebuilds/{unique_host}/vm-1/approve", json={"reason": "x" * 501}, headers=AUTH
    )
    assert too_long.status == 400
    assert "reason" in (await too_long.json())["error"]
    await api.post(f"/v1/rebuilds/{unique_host}/vm-1/abort", json={"reason": "test over"}, headers=AUTH)


async def test_identity_through_the_api_hashes_the_password_and_refuses_bad_input(
    api: TestClient[Any, Any], client: Client, unique_host: str, fake_host: FakeHost
) -> None:
    password = "api-secret-4711"
    identity = {"hostname": "web-1", "admin_password": password, "user_data": "#cloud-config\n"}
    body = start_body(unique_host, "vm-id", identity=identity, require_approval=True)
    response = await api.post("/v1/rebuilds", json=body, headers=AUTH)
    assert response.status == 201, await response.text()
    handle = client.get_workflow_handle(rebuild_workflow_id(unique_host, "vm-id"))
    stored = b"".join(e.SerializeToString() for e in (await handle.fetch_history()).events)
    assert password.encode() not in stored and b"$6$" in stored
    await handle.terminate("test over")

    bad = start_body(unique_host, "vm-bad", identity={"hostname": "not_a_host!"})
    response = await api.post("/v1/rebuilds", json=bad, headers=AUTH)
    assert response.status == 400
    assert "RFC 1123" in (await response.json())["error"]
