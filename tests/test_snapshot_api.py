"""The snapshot endpoints with aiohttp's test client, against the real dev server and a fake host."""

from __future__ import annotations

from typing import Any

from aiohttp.test_utils import TestClient
from temporalio.client import Client

from devtools.testbed.fake_host import FakeHost
from tests.api_support import AUTH
from workflows.snapshot_models import SnapshotRecord


async def test_create_list_show_delete(
    api: TestClient[Any, Any], client: Client, unique_host: str, fake_host: FakeHost
) -> None:
    created = await api.post("/v1/snapshots", json={"instance": "vm-1", "host": unique_host}, headers=AUTH)
    assert created.status == 201, await created.text()
    started = await created.json()
    record = await client.get_workflow_handle(started["workflow_id"], result_type=SnapshotRecord).result()

    listed = await api.get(f"/v1/snapshots/{unique_host}", params={"instance": "vm-1"}, headers=AUTH)
    assert listed.status == 200
    assert [r["snapshot_id"] for r in await listed.json()] == [record.snapshot_id]
    shown = await api.get(f"/v1/snapshots/{unique_host}/{record.snapshot_id}", headers=AUTH)
    assert shown.status == 200 and (await shown.json())["sha256"] == record.sha256

    deleted = await api.delete(f"/v1/snapshots/{unique_host}/{record.snapshot_id}", headers=AUTH)
    assert deleted.status == 200 and (await deleted.json())["deleted"] == [record.snapshot_id]
    gone = await api.get(f"/v1/snapshots/{unique_host}/{record.snapshot_id}", headers=AUTH)
    assert gone.status == 404
    again = await api.delete(f"/v1/snapshots/{unique_host}/{record.snapshot_id}", headers=AUTH)
    assert again.status == 404 and record.snapshot_id in (await again.json())["error"]


async def test_bad_snapshot_requests_are_refused_before_anything_runs(
    api: TestClient[Any, Any], unique_host: str, fake_host: FakeHost
) -> None:
    for body in (
        {"instance": "vm-1", "host": unique_host, "keep": 0},
        {"instance": "../vm", "host": unique_host},
        {"instance": "vm-1", "host": unique_host, "quiesce": "sometimes"},
        {"instance": "vm-1", "host": unique_host, "path": "/etc/shadow"},
    ):
        refused = await api.post("/v1/snapshots", json=body, headers=AUTH)
        assert refused.status == 400, body
    assert (await api.get(f"/v1/snapshots/{unique_host}/..%2Fetc", headers=AUTH)).status == 404
    assert (await api.get("/v1/snapshots/bad host!", headers=AUTH)).status == 400
    assert fake_host.calls == []
