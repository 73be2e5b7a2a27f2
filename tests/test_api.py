"""The HTTP API with aiohttp's test client, against the real dev server and a fake host."""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from temporalio.client import Client, WorkflowFailureError

from devtools.testbed.fake_host import FakeHost
from starter.api import openapi_document
from tests.api_support import AUTH, OTHER_TOKEN, TOKEN
from workflows.models import rebuild_workflow_id


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
    workflow_id = rebuild_workflow_id(unique_host, "vm-1")
    assert await again.json() == {
        "error": f"a rebuild of vm-1 on {unique_host} is already running (workflow {workflow_id}); "
        f"see: GET /v1/rebuilds/{unique_host}/vm-1",
        "status": 409,
        "type": "RebuildAlreadyRunning",
    }

    for _ in range(100):
        shown = await (await api.get(f"/v1/rebuilds/{unique_host}/vm-1", headers=AUTH)).json()
        if shown["status"] and shown["status"]["phase"] == "await-approval":
            break
        await asyncio.sleep(0.05)
    assert shown["workflow_status"] == "RUNNING"
    assert shown["status"]["phase"] == "await-approval"

    listed = await api.get("/v1/rebuilds", params={"host": unique_host, "running": "true"}, headers=AUTH)
    assert listed.status == 200

    # The requester may not approve its own rebuild: another client does.
    approved = await api.post(
        f"/v1/rebuilds/{unique_host}/vm-1/approve",
        json={"requested_by": "ci"},
        headers={"Authorization": f"Bearer {OTHER_TOKEN}"},
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
        ({"instance": "vm-1", "host": "h", "image_url": "http://x/y", "sha256": "zz"}, "sha256: must be"),
        (
            {"instance": "vm-1", "host": "h", "image_url": "http://x/y", "snapshot_id": "ab" * 16},
            "exactly one of",
        ),
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
    assert document == openapi_document(api.app)
    routes = {
        (resource.canonical, route.method)
        for resource in api.app.router.resources()
        for route in resource
        if route.method != "HEAD"
    }
    documented = {(path, method.upper()) for path, ops in document["paths"].items() for method in ops}
    # aiohttp's {verdict:approve|confirm|revert} is OpenAPI's {verdict}, an enum of the three.
    served = {(re.sub(r"\{(\w+):[^}]+\}", r"{\1}", path), m) for path, m in routes}
    assert served == documented
    decide = document["paths"]["/v1/rebuilds/{host}/{instance}/{verdict}"]["post"]
    (verdict,) = [p for p in decide["parameters"] if p["name"] == "verdict"]
    assert verdict["schema"]["enum"] == ["approve", "confirm", "revert"]
    assert "RebuildRequest" in document["components"]["schemas"]


async def test_a_host_nobody_serves_is_400_and_nothing_starts(
    api: TestClient[Any, Any], client: Client, unique_host: str
) -> None:
    response = await api.post("/v1/rebuilds", json=start_body(unique_host), headers=AUTH)
    assert response.status == 400
    refusal = (await response.json())["error"]
    assert refusal.startswith(f"no worker polls rebuild-host-{unique_host} (is the host right?); ")
    assert "--host" not in refusal  # the CLI's words, not the API's
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


async def test_healthz_needs_no_token_and_reports_temporal(api: TestClient[Any, Any]) -> None:
    response = await api.get("/healthz")
    assert response.status == 200
    assert await response.json() == {"status": "ok", "temporal": "serving"}


async def test_every_error_is_json_with_its_status(api: TestClient[Any, Any]) -> None:
    unknown = await api.get("/v2/nothing", headers=AUTH)
    assert unknown.status == 404
    assert await unknown.json() == {"error": "not found", "status": 404, "type": "NotFound"}
    wrong_method = await api.delete("/v1/rebuilds", headers=AUTH)
    assert wrong_method.status == 405
    assert (await wrong_method.json())["status"] == 405
    assert "GET" in wrong_method.headers["Allow"]
    anonymous = await api.get("/v1/rebuilds")
    assert anonymous.status == 401
    assert anonymous.headers["WWW-Authenticate"] == "Bearer"
    assert anonymous.content_type == "application/json"


@pytest.mark.parametrize(
    ("limit", "fragment"),
    [("abc", "limit must be a whole number from 1 to 1000, not 'abc'"), ("0", "not 0"), ("5000", "not 5000")],
)
async def test_a_bad_limit_is_400_with_a_message(
    api: TestClient[Any, Any], limit: str, fragment: str
) -> None:
    response = await api.get("/v1/rebuilds", params={"limit": limit}, headers=AUTH)
    assert response.status == 400
    assert fragment in (await response.json())["error"]


async def test_the_token_names_the_requester_whatever_the_body_claims(
    api: TestClient[Any, Any], client: Client, unique_host: str, fake_host: FakeHost
) -> None:
    bot = {"Authorization": f"Bearer {OTHER_TOKEN}"}
    claimed = start_body(unique_host, require_approval=True, requested_by="alice")
    assert (await api.post("/v1/rebuilds", json=claimed, headers=bot)).status == 201
    handle = client.get_workflow_handle(rebuild_workflow_id(unique_host, "vm-1"))
    details = await (await handle.describe()).static_details()
    assert details is not None
    assert "requested by: deploy-bot (for alice)" in details
    aborted = await api.post(f"/v1/rebuilds/{unique_host}/vm-1/abort", json={"reason": "r"}, headers=AUTH)
    assert (await aborted.json())["accepted"] is True
    with pytest.raises(WorkflowFailureError):
        await handle.result()

    plain = start_body(unique_host, instance="vm-2")
    assert (await api.post("/v1/rebuilds", json=plain, headers=AUTH)).status == 201
    second = client.get_workflow_handle(rebuild_workflow_id(unique_host, "vm-2"))
    assert "requested by: ci\n" in ((await (await second.describe()).static_details()) or "") + "\n"


async def test_openapi_document_is_valid_and_names_every_operation(api: TestClient[Any, Any]) -> None:
    from openapi_spec_validator import validate

    document = await (await api.get("/openapi.json")).json()
    validate(document)
    operations = [op for ops in document["paths"].values() for op in ops.values()]
    ids = [op["operationId"] for op in operations]
    assert len(ids) == len(set(ids))
    assert all(op["tags"] for op in operations)
    for path, ops in document["paths"].items():
        for method, op in ops.items():
            if path not in ("/openapi.json",):
                assert "503" in op["responses"], (method, path)
            if op.get("security") != []:
                assert "401" in op["responses"], (method, path)
    assert "400" in document["paths"]["/v1/rebuilds"]["get"]["responses"]


async def test_a_finished_rebuild_is_answered_without_a_worker(
    api: TestClient[Any, Any], client: Client, unique_host: str
) -> None:
    """No worker polls its workflow queue any more: a status query would wait seconds for one."""
    from devtools.testbed.fake_host import request_for, running_workers

    for fake, instance in ((FakeHost(), "vm-ok"), (FakeHost(fail_at="verify_instance"), "vm-bad")):
        async with running_workers(client, unique_host, fake) as queue:
            handle = await client.start_workflow(
                "RebuildInstance",
                request_for(unique_host, instance=instance),
                id=rebuild_workflow_id(unique_host, instance),
                task_queue=queue,
            )
            with contextlib.suppress(WorkflowFailureError):
                await handle.result()
    began = time.monotonic()
    ok = await (await api.get(f"/v1/rebuilds/{unique_host}/vm-ok", headers=AUTH)).json()
    bad = await (await api.get(f"/v1/rebuilds/{unique_host}/vm-bad", headers=AUTH)).json()
    assert time.monotonic() - began < 1.0
    assert ok["workflow_status"] == "COMPLETED"
    assert ok["status"]["phase"] == "done"
    assert ok["result"]["outcome"] == "rebuilt"
    assert set(ok["status"]["step_seconds"]) >= {"inspect", "fetch", "stop", "prepare", "start", "verify"}
    assert bad["workflow_status"] == "FAILED"
    assert bad["status"]["phase"] == "rolled-back"
    assert bad["result"]["outcome"] == "rolled-back"
    assert bad["result"]["failed_step"] == "verify"
    assert "verify_instance failed on purpose" in bad["status"]["last_error"]


async def test_a_start_says_where_its_status_is_and_lists_page_by_cursor(
    api: TestClient[Any, Any], client: Client, unique_host: str, fake_host: FakeHost
) -> None:
    """Issue 26, point 5: Location on 201, run_id in each row, and every older rebuild reachable
    through Link: rel="next" (Temporal's next-page token as a cursor)."""
    run_ids = []
    for instance in ("vm-a", "vm-b", "vm-c"):
        started = await api.post("/v1/rebuilds", json=start_body(unique_host, instance), headers=AUTH)
        assert started.status == 201
        assert started.headers["Location"] == f"/v1/rebuilds/{unique_host}/{instance}"
        run_ids.append((await started.json())["run_id"])
        shown = await api.get(started.headers["Location"], headers=AUTH)
        assert shown.status == 200
    seen: list[dict[str, Any]] = []
    url: str | None = f"/v1/rebuilds?host={unique_host}&limit=2"
    pages = 0
    while url is not None:
        page = await api.get(url, headers=AUTH)
        assert page.status == 200
        rows = await page.json()
        assert len(rows) <= 2
        seen += rows
        pages += 1
        link = page.headers.get("Link")
        url = link.split(">", 1)[0].removeprefix("<") if link else None
        assert pages <= 3, "the cursor never ended"
    assert pages == 2
    assert sorted(row["instance"] for row in seen) == ["vm-a", "vm-b", "vm-c"]
    assert sorted(row["run_id"] for row in seen) == sorted(run_ids)
    for cursor, kind in (("%%%", "BadQuery"), ("bm90LWEtdG9rZW4", "BadCursor")):
        bad = await api.get("/v1/rebuilds", params={"cursor": cursor}, headers=AUTH)
        assert bad.status == 400, await bad.text()
        assert (await bad.json())["type"] == kind
