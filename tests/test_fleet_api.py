"""The fleet endpoints of the HTTP API, against the dev server and simulated hosts."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from temporalio.client import Client

from devtools.testbed.fleet import IMAGE_URL, simulated_fleet
from starter.api import openapi_document
from tests.api_support import AUTH
from workflows.models import WORKFLOW_TASK_QUEUE


@pytest.mark.fleet
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
        assert await again.json() == {
            "error": f"fleet {name} is already running (workflow fleet:{name}); see: GET /v1/fleets/{name}",
            "status": 409,
            "type": "FleetAlreadyRunning",
        }

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
    assert await late_abort.json() == {
        "error": f"fleet {name} is not running",
        "status": 409,
        "type": "FleetNotRunning",
    }
    assert unknown.status == 404


async def test_openapi_describes_the_fleet_endpoints(api: TestClient[Any, Any]) -> None:
    document = openapi_document(api.app)
    assert {"/v1/fleets", "/v1/fleets/{name}", "/v1/fleets/{name}/abort", "/v1/fleets/{name}/pause"} <= set(
        document["paths"]
    )
    assert "FleetRequest" in document["components"]["schemas"]


async def test_fleet_errors_are_json_with_their_status_as_for_rebuilds(api: TestClient[Any, Any]) -> None:
    unknown = await api.get("/v1/fleets/no-such-fleet", headers=AUTH)
    unknown_fleet = {"error": "no fleet named no-such-fleet is known", "status": 404, "type": "UnknownFleet"}
    assert await unknown.json() == unknown_fleet
    steered = await api.post("/v1/fleets/no-such-fleet/pause", headers=AUTH)
    assert await steered.json() == unknown_fleet
    not_json = await api.post("/v1/fleets", data=b"{", headers=AUTH)
    assert await not_json.json() == {"error": "the body must be JSON", "status": 400, "type": "BadRequest"}


@pytest.mark.parametrize("limit", ["abc", "0", "5000"])
async def test_a_fleet_listing_takes_its_limit_as_the_rebuild_listing_does(
    api: TestClient[Any, Any], limit: str
) -> None:
    fleets = await api.get("/v1/fleets", params={"limit": limit}, headers=AUTH)
    rebuilds = await api.get("/v1/rebuilds", params={"limit": limit}, headers=AUTH)
    assert fleets.status == rebuilds.status == 400
    assert await fleets.json() == await rebuilds.json()


async def test_a_page_of_instances_refuses_what_it_cannot_use(api: TestClient[Any, Any]) -> None:
    for query, message in (
        ({"offset": "-1"}, "offset must be 0 or more, not -1"),
        ({"limit": "x"}, "limit must be a whole number from 1 to 5000, not 'x'"),
        (
            {"state": "gone"},
            "state must be one of waiting, running, rebuilt, rolled-back, failed, skipped, aborted",
        ),
    ):
        page = await api.get("/v1/fleets/some-fleet/instances", params=query, headers=AUTH)
        assert page.status == 400, query
        assert (await page.json())["error"].startswith(message)
