"""Issue 24, finding 2, from the attacker's side: an API client with a valid but scoped token.

Each client reaches the hosts and instances its line names, with its verbs; a requester does not
approve its own rebuild; a fleet over a pattern needs the verb fleet and a scope of that pattern.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from temporalio.client import Client

from devtools.testbed.fake_host import FakeHost
from starter.api import create_app
from starter.api_clients import ApiClient, ApiClients, TokensFileError
from workflows.models import rebuild_workflow_id

PORTAL = "portal-token-0123456789"
SELF = "self-token-0123456789ab"
APPROVER = "approver-token-0123456789"
FLEETER = "fleeter-token-0123456789"
OWNER = "owner-token-0123456789ab"
FLEET_OPS = "fleet-ops-token-0123456789"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def clients_for(host: str) -> ApiClients:
    return ApiClients.parse(
        f"portal {PORTAL} hosts={host} instances=web-* verbs=start\n"
        f"self {SELF} hosts={host} instances=* verbs=start,approve\n"
        f"approver {APPROVER} hosts={host} instances=web-*,db-* verbs=approve,confirm,revert\n"
        f"fleeter {FLEETER} hosts=* instances=web-* verbs=fleet\n"
        f"owner {OWNER} hosts={host} instances=* verbs=start,approve,self-approve,abort,snapshot\n"
        f"fleet-ops {FLEET_OPS} hosts=* instances=* verbs=fleet\n"
    )


@pytest.fixture
async def scoped_api(client: Client, unique_host: str) -> AsyncIterator[TestClient[Any, Any]]:
    test_client = TestClient(TestServer(create_app(client, clients_for(unique_host))))
    await test_client.start_server()
    yield test_client
    await test_client.close()


def body(host: str, instance: str, **extra: Any) -> dict[str, Any]:
    return {"instance": instance, "host": host, "image_url": "http://images.invalid/b.qcow2", **extra}


async def until_phase(api: TestClient[Any, Any], host: str, instance: str, phase: str) -> dict[str, Any]:
    for _ in range(100):
        shown: dict[str, Any] = await (
            await api.get(f"/v1/rebuilds/{host}/{instance}", headers=bearer(OWNER))
        ).json()
        if shown.get("status") and shown["status"]["phase"] == phase:
            return shown
        await asyncio.sleep(0.05)
    raise AssertionError(f"never reached {phase}: {shown}")


async def test_a_client_reaches_only_its_hosts_and_instances_and_nothing_starts(
    scoped_api: TestClient[Any, Any], unique_host: str, fake_host: FakeHost
) -> None:
    for target in (body(unique_host, "db-1"), body("other-host", "web-1")):
        refused = await scoped_api.post("/v1/rebuilds", json=target, headers=bearer(PORTAL))
        assert refused.status == 403
        assert "portal may not touch" in (await refused.json())["error"]
    assert (await scoped_api.get(f"/v1/rebuilds/{unique_host}/db-1", headers=bearer(OWNER))).status == 404
    # Nor may it steer or read what is outside its scope.
    started = await scoped_api.post("/v1/rebuilds", json=body(unique_host, "db-1", require_approval=True),
                                    headers=bearer(OWNER))  # fmt: skip
    assert started.status == 201
    peek = await scoped_api.get(f"/v1/rebuilds/{unique_host}/db-1", headers=bearer(PORTAL))
    assert peek.status == 403
    abort = await scoped_api.post(f"/v1/rebuilds/{unique_host}/db-1/abort", json={"reason": "mine now"},
                                  headers=bearer(PORTAL))  # fmt: skip
    assert abort.status == 403
    assert (await abort.json()) == {"error": "forbidden: client portal may not abort (its verbs: start)",
                                    "status": 403, "type": "Forbidden"}  # fmt: skip
    listed = await scoped_api.get("/v1/rebuilds", params={"host": unique_host}, headers=bearer(PORTAL))
    assert [row["instance"] for row in await listed.json()] == []
    await scoped_api.post(
        f"/v1/rebuilds/{unique_host}/db-1/abort", json={"reason": "end"}, headers=bearer(OWNER)
    )


async def test_a_requester_may_not_approve_its_own_rebuild_another_client_may_and_is_recorded(
    scoped_api: TestClient[Any, Any], client: Client, unique_host: str, fake_host: FakeHost
) -> None:
    started = await scoped_api.post("/v1/rebuilds", json=body(unique_host, "web-1", require_approval=True),
                                    headers=bearer(SELF))  # fmt: skip
    assert started.status == 201
    await until_phase(scoped_api, unique_host, "web-1", "await-approval")

    for token in (SELF, PORTAL):
        refused = await scoped_api.post(f"/v1/rebuilds/{unique_host}/web-1/approve", headers=bearer(token))
        assert refused.status == 403
    assert "may not approve it itself" in (await (await scoped_api.post(
        f"/v1/rebuilds/{unique_host}/web-1/approve", headers=bearer(SELF))).json())["error"]  # fmt: skip
    assert (await until_phase(scoped_api, unique_host, "web-1", "await-approval"))["status"][
        "approved_by"
    ] is None

    approved = await scoped_api.post(f"/v1/rebuilds/{unique_host}/web-1/approve", headers=bearer(APPROVER))
    assert approved.status == 202
    handle = client.get_workflow_handle(rebuild_workflow_id(unique_host, "web-1"))
    assert (await handle.result())["outcome"] == "rebuilt"
    status = await handle.query("status")
    assert status["approved_by"] == "approver"


async def test_self_approval_is_a_verb_of_its_own(
    scoped_api: TestClient[Any, Any], client: Client, unique_host: str, fake_host: FakeHost
) -> None:
    await scoped_api.post("/v1/rebuilds", json=body(unique_host, "vm-2", require_approval=True),
                          headers=bearer(OWNER))  # fmt: skip
    await until_phase(scoped_api, unique_host, "vm-2", "await-approval")
    approved = await scoped_api.post(f"/v1/rebuilds/{unique_host}/vm-2/approve", headers=bearer(OWNER))
    assert approved.status == 202
    handle = client.get_workflow_handle(rebuild_workflow_id(unique_host, "vm-2"))
    assert (await handle.result())["outcome"] == "rebuilt"


async def test_a_fleet_needs_the_fleet_verb_and_a_scope_that_covers_its_pattern(
    scoped_api: TestClient[Any, Any], unique_host: str
) -> None:
    fleet = {
        "name": f"f-{unique_host}",
        "rebuild": {"image_url": "http://images.invalid/b.qcow2"},
        "selection": {"hosts": [unique_host], "name_pattern": "*"},
    }
    # portal may start rebuilds of web-* one by one, but no fleet at all.
    refused = await scoped_api.post("/v1/fleets", json=fleet, headers=bearer(PORTAL))
    assert refused.status == 403
    assert "may not fleet" in (await refused.json())["error"]
    assert (await scoped_api.get("/v1/fleets", headers=bearer(PORTAL))).status == 403
    # fleeter has the verb, but its instances are web-*, not everything on the host.
    wide = await scoped_api.post("/v1/fleets", json=fleet, headers=bearer(FLEETER))
    assert wide.status == 403
    assert "over the pattern '*'" in (await wide.json())["error"]
    listed = {**fleet, "selection": {"instances": [{"host": unique_host, "instance": "db-1"}]}}
    assert (await scoped_api.post("/v1/fleets", json=listed, headers=bearer(FLEETER))).status == 403


async def test_steering_a_fleet_needs_every_host_it_touches_in_scope(
    scoped_api: TestClient[Any, Any], client: Client, unique_host: str
) -> None:
    name = f"wide-{unique_host}"
    fleet = {
        "name": name,
        "rebuild": {"image_url": "http://images.invalid/b.qcow2"},
        "selection": {"hosts": [f"{unique_host}-elsewhere"], "name_pattern": "web-*"},
    }
    started = await scoped_api.post("/v1/fleets", json=fleet, headers=bearer(FLEET_OPS))
    assert started.status == 201, await started.text()
    try:
        # portal has no verb fleet; narrow has it, but its hosts leave out the fleet's.
        for path, body in (("pause", None), ("abort", {"reason": "mine"}), ("batch-size", {"batch_size": 2})):
            refused = await scoped_api.post(f"/v1/fleets/{name}/{path}", json=body, headers=bearer(PORTAL))
            assert refused.status == 403
        narrow = ApiClients.parse(f"narrow {PORTAL} hosts={unique_host} instances=* verbs=fleet")
        app = TestClient(TestServer(create_app(client, narrow)))
        await app.start_server()
        try:
            refused = await app.post(f"/v1/fleets/{name}/abort", json={"reason": "x"}, headers=bearer(PORTAL))
            assert refused.status == 403
            assert f"may not touch host {unique_host}-elsewhere" in (await refused.json())["error"]
        finally:
            await app.close()
    finally:
        await client.get_workflow_handle(f"fleet:{name}").terminate("test over")


async def test_snapshots_need_the_snapshot_verb_on_the_instance(
    scoped_api: TestClient[Any, Any], unique_host: str
) -> None:
    wanted = {"instance": "web-1", "host": unique_host}
    refused = await scoped_api.post("/v1/snapshots", json=wanted, headers=bearer(PORTAL))
    assert refused.status == 403
    assert (await scoped_api.get(f"/v1/snapshots/{unique_host}", headers=bearer(PORTAL))).status == 403
    gone = await scoped_api.delete(f"/v1/snapshots/{unique_host}/{'0' * 32}", headers=bearer(APPROVER))
    assert gone.status == 403


def test_a_line_of_the_old_format_keeps_working_without_self_approval() -> None:
    clients = ApiClients.parse("ci a-token-long-enough-1\n")
    ci = clients.identify("Bearer a-token-long-enough-1")
    assert ci == ApiClient("ci", legacy=True)
    assert ci.may_reach("any-host", "any-instance")
    assert "self-approve" not in ci.verbs and "fleet" in ci.verbs
    assert clients.legacy_names() == ["ci"]


@pytest.mark.parametrize(
    ("line", "fragment"),
    [
        ("p a-token-long-enough-1 hosts=hv-1", "needs instances=, verbs= too"),
        ("p a-token-long-enough-1 hosts=hv-1 instances=* verbs=start,rule", "unknown verbs rule"),
        ("p a-token-long-enough-1 hosts=hv-1 instances=* verbs=", "verbs= is empty"),
        ("p a-token-long-enough-1 hosts=hv/1 instances=* verbs=start", "not a usable pattern"),
        ("p a-token-long-enough-1 hosts=hv-1 hosts=hv-2 instances=* verbs=start", "hosts= appears twice"),
        ("p a-token-long-enough-1 tenant=x", "not one of hosts=, instances=, verbs="),
    ],
)
def test_a_scoped_line_that_cannot_be_used_is_refused_with_its_line(line: str, fragment: str) -> None:
    with pytest.raises(TokensFileError, match=fragment):
        ApiClients.parse(line)


async def test_a_client_of_the_old_format_may_not_approve_its_own_rebuild(
    api: TestClient[Any, Any], client: Client, unique_host: str, fake_host: FakeHost
) -> None:
    from tests.api_support import AUTH, OTHER_TOKEN

    started = await api.post(
        "/v1/rebuilds", json=body(unique_host, "vm-9", require_approval=True), headers=AUTH
    )
    assert started.status == 201
    for _ in range(100):
        shown = await (await api.get(f"/v1/rebuilds/{unique_host}/vm-9", headers=AUTH)).json()
        if shown.get("status") and shown["status"]["phase"] == "await-approval":
            break
        await asyncio.sleep(0.05)
    own = await api.post(f"/v1/rebuilds/{unique_host}/vm-9/approve", headers=AUTH)
    assert own.status == 403
    other = await api.post(f"/v1/rebuilds/{unique_host}/vm-9/approve", headers=bearer(OTHER_TOKEN))
    assert other.status == 202
    handle = client.get_workflow_handle(rebuild_workflow_id(unique_host, "vm-9"))
    assert (await handle.result())["outcome"] == "rebuilt"
    assert (await handle.query("status"))["approved_by"] == "deploy-bot"
