"""The fleet endpoints of the HTTP API, against the dev server and simulated hosts."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from temporalio.client import Client

from devtools.testbed.fleet import IMAGE_URL, simulated_fleet
from starter.api import create_app, openapi_document
from starter.api_clients import ApiClients
from workflows.models import WORKFLOW_TASK_QUEUE

TOKEN = "s3cret-fleet-token-0123456789"
CLIENTS = ApiClients.parse(f"# name token\nci {TOKEN}\n")
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
async def api(client: Client) -> AsyncIterator[TestClient[Any, Any]]:
    test_client = TestClient(TestServer(create_app(client, CLIENTS)))
    await test_client.start_server()
    yield test_client
    await test_client.close()


async def test_start_steer_and_follow_a_fleet_over_http(
    api: TestClient[Any, Any], client: Client, unique_host: str, tmp_path: Path
) -> None:
    hosts = simulated_fleet(client, tmp_path, unique_host, hosts=2, per_host=4, queue=WORKFLOW_TASK_QUEUE)
    async with hosts as fleet:
        name = f"api-{unique_host}"
        body = {
            "name": name,
            "rebuild": {"image_url": IMAGE_URL, "sha256": fleet.sha256, "stop_timeout_seconds": 0},
            "selection": {"hosts": list(fleet.hosts), "name_pattern": "vm-*"},
            "limits": {"batch_size": 4, "max_unavailable": 1, "max_failures": 2},
        }
        assert (await api.post("/v1/fleets", json=body)).status == 401
        bad = await api.post("/v1/fleets", json={**body, "limits": {"max_unavailable": 0}}, headers=AUTH)
        assert bad.status == 400 and "max_unavailable" in (await bad.json())["error"]

        started = await api.post("/v1/fleets", json=body, headers=AUTH)
        assert started.status == 201, await started.text()
        assert (await started.json())["workflow_id"] == f"fleet:{name}"
        again = await api.post("/v1/fleets", json=body, headers=AUTH)
        assert again.status == 409 and "already running" in (await again.json())["error"]

        paused = await api.post(f"/v1/fleets/{name}/pause", headers=AUTH)
        assert paused.status == 200 and (await paused.json())["paused"] is True
        assert (await api.post(f"/v1/fleets/{name}/pause", headers=AUTH)).status == 409
        shown = await (await api.get(f"/v1/fleets/{name}", headers=AUTH)).json()
        assert shown["workflow_status"] == "RUNNING" and shown["status"]["paused"] is True
        resized = await api.post(f"/v1/fleets/{name}/batch-size", json={"batch_size": 8}, headers=AUTH)
        assert resized.status == 200 and (await resized.json())["batch_size"] == 8
        assert (await api.post(f"/v1/fleets/{name}/resume", headers=AUTH)).status == 200

        for _ in range(600):
            shown = await (await api.get(f"/v1/fleets/{name}", headers=AUTH)).json()
            if shown["workflow_status"] != "RUNNING":
                break
            await asyncio.sleep(0.1)
        rebuilt = await api.get(f"/v1/fleets/{name}/instances?state=rebuilt", headers=AUTH)
        listed = await (await api.get("/v1/fleets", headers=AUTH)).json()
        late_abort = await api.post(f"/v1/fleets/{name}/abort", json={"reason": "too late"}, headers=AUTH)
        unknown = await api.get("/v1/fleets/no-such-fleet", headers=AUTH)

    assert shown["workflow_status"] == "COMPLETED"
    assert shown["report"]["counts"]["rebuilt"] == 8 and shown["report"]["stop_reason"] is None
    assert (await rebuilt.json())["total"] == 8
    assert name in {row["name"] for row in listed}
    assert late_abort.status == 409 and "not running" in (await late_abort.json())["error"]
    assert unknown.status == 404


def test_openapi_describes_the_fleet_endpoints() -> None:
    document = openapi_document()
    assert {"/v1/fleets", "/v1/fleets/{name}", "/v1/fleets/{name}/abort", "/v1/fleets/{name}/pause"} <= set(
        document["paths"]
    )
    assert "FleetRequest" in document["components"]["schemas"]
