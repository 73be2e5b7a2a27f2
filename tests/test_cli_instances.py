"""Issue 25, point 4: the operator need not know the hypervisor. ``rebuild instances`` lists every
host's instances through its worker, and ``--host`` may be left out when one host has the instance.

The CLI runs as a subprocess at 80 columns against the dev server and two hosts, each a worker on its
own host queue whose host activities are the real ones on libvirt's ``test:///`` driver.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
from temporalio.client import Client, WorkflowHandle

from common.exit_codes import ExitCode
from devtools.image_server import ImageServer
from devtools.temporal_dev import DevServer
from devtools.testbed.e2e import serve
from starter.api_clients import ApiClients
from starter.instances import list_instances
from starter.rebuilds import check_host_has_worker
from tests.api_support import serve_api
from tests.driver_hosts import DriverHost, driver_host, make_root_disk_a_bare_block_device
from tests.history_recorder import record_fleet_history
from workflows.inventory_models import DEFAULT_ANSWER_WITHIN_SECONDS, INVENTORY_WORKFLOW

WEB_TOKEN = "web-portal-token-0123456789"


@dataclass
class TwoHosts:
    a: DriverHost
    b: DriverHost


@pytest.fixture(scope="module")
async def hosts(
    dev_server: DevServer, client: Client, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[TwoHosts]:
    """Host a: web-1, web-2, both-1. Host b: db-1 (shut off), db-2 (a root disk no back end takes),
    both-1. Shared by the module's tests, each of which uses its own instances."""
    root = tmp_path_factory.mktemp("two-hosts")
    suffix = uuid.uuid4().hex[:6]
    address = dev_server.address
    async with (
        driver_host(address, f"kvm-a-{suffix}", root / "a", ["web-1", "web-2", "both-1"]) as a,
        driver_host(address, f"kvm-b-{suffix}", root / "b", ["db-1", "db-2", "both-1"]) as b,
    ):
        for host in (a, b):  # polling, so a listing reaches it from the first test on
            await check_host_has_worker(client, host.name, grace_seconds=30)
        b.instances[0].libvirt.connection().lookupByName("db-1").destroy()
        make_root_disk_a_bare_block_device(b, 1)
        yield TwoHosts(a, b)


async def newest_listing(client: Client) -> WorkflowHandle[Any, Any]:
    """The last ``InstanceInventory`` run, for the replay test's saved histories."""
    async for execution in client.list_workflows(f"WorkflowType = '{INVENTORY_WORKFLOW}'", limit=1):
        return client.get_workflow_handle(execution.id, run_id=execution.run_id)
    raise AssertionError("no InstanceInventory run is known")


def row_of(out: str, host: str, instance: str) -> list[str]:
    """The table row of ``instance`` on ``host``, split into its cells."""
    for line in out.splitlines():
        cells = line.split()
        if cells[:2] == [host, instance]:
            return cells
    raise AssertionError(f"no row for {instance} on {host} in:\n{out}")


async def test_instances_lists_each_hosts_instances_with_state_root_disk_image_and_last_rebuild(
    hosts: TwoHosts, images: ImageServer
) -> None:
    a, b = hosts.a, hosts.b
    url, sha = serve(images, "image B", "qcow2")
    code, _, err = await a.cli(
        "start", "web-1", "--host", a.name, "--image", url, "--sha256", sha, "--stop-timeout", "0", "--wait"
    )
    assert code == ExitCode.OK, err
    code, out, err = await a.cli("instances", "--host", a.name, "--host", b.name)
    assert code == ExitCode.OK, (out, err)
    assert out.splitlines()[0].split() == [
        "host",
        "instance",
        "state",
        "root",
        "disk",
        "image",
        "last",
        "rebuild",
    ]
    assert max(len(line) for line in out.splitlines()) <= 80
    assert row_of(out, a.name, "web-1")[2:6] == ["running", "file", "image-B.qcow2", "done"]
    assert row_of(out, a.name, "web-2")[2:] == ["running", "file", "-", "-"]
    assert row_of(out, b.name, "db-1")[2:5] == ["shut", "off", "file"]
    assert row_of(out, b.name, "db-2")[2:5] == ["running", "block", "(no)"]
    assert f"db-2 on {b.name}: not rebuildable: " in out
    assert "/dev/sdz, which belongs to no libvirt storage pool" in " ".join(out.split())

    code, out, err = await a.cli("instances", "--host", a.name, "--host", b.name, "--json")
    assert code == ExitCode.OK, err
    shown = json.loads(out)
    assert [(h["host"], h["answered"], h["instances"]) for h in shown["hosts"]] == [
        (a.name, True, 3),
        (b.name, True, 3),
    ]
    web1 = next(r for r in shown["instances"] if (r["host"], r["instance"]) == (a.name, "web-1"))
    assert (web1["image_url"], web1["image_sha256"], web1["root_disk"]) == (url, sha, "file")
    assert (web1["last_rebuild"]["status"], web1["last_rebuild"]["phase"]) == ("COMPLETED", "done")
    db2 = next(r for r in shown["instances"] if r["instance"] == "db-2")
    assert db2["root_disk"] == "block" and "storage pool" in db2["refusal"]


async def test_instances_without_host_asks_every_host_with_a_worker(hosts: TwoHosts) -> None:
    code, out, err = await hosts.a.cli("instances", "--json")
    shown = json.loads(out)
    listed = {(r["host"], r["instance"]) for r in shown["instances"]}
    assert {(hosts.a.name, "web-2"), (hosts.b.name, "db-1"), (hosts.b.name, "both-1")} <= listed
    # Hosts whose worker went away a moment ago (other tests') are still asked: they do not answer.
    silent = [h["host"] for h in shown["hosts"] if not h["answered"]]
    assert code == (ExitCode.BAD_INPUT if silent else ExitCode.OK), err
    assert hosts.a.name not in silent and hosts.b.name not in silent


async def test_start_without_host_uses_the_one_host_that_has_the_instance(
    hosts: TwoHosts, images: ImageServer
) -> None:
    a = hosts.a
    url, sha = serve(images, "image B", "qcow2")
    code, out, err = await a.cli("start", "web-2", "--image", url, "--sha256", sha, "--require-approval")
    assert code == ExitCode.OK, (out, err)
    assert f"web-2 is on host {a.name}" in err
    assert out.startswith(f"started rebuild of web-2 on {a.name}")
    # Following and steering it need no --host either: its host is the one its rebuild runs on.
    code, out, err = await a.cli("status", "web-2")
    assert code == ExitCode.OK, err
    assert "phase: await-approval" in out
    assert f"web-2: rebuild on host {a.name}" in err
    code, out, err = await a.cli("abort", "web-2", "--reason", "test over")
    assert code == ExitCode.OK, err
    assert "abort accepted" in out


async def test_start_of_an_instance_no_host_has_exits_2_naming_it_and_the_hosts_asked(
    hosts: TwoHosts,
) -> None:
    code, out, err = await hosts.a.cli("start", "no-such-vm", "--image", "http://127.0.0.1:9/x.qcow2")
    assert code == ExitCode.BAD_INPUT, (out, err)
    said = " ".join(err.split())
    assert "no host has an instance named 'no-such-vm'; hosts asked: " in said
    assert hosts.a.name in said and hosts.b.name in said
    assert "--host" in said and "Traceback" not in err
    assert "started" not in out


async def test_start_of_an_instance_on_two_hosts_exits_2_listing_both(hosts: TwoHosts) -> None:
    code, out, err = await hosts.a.cli("start", "both-1", "--image", "http://127.0.0.1:9/x.qcow2")
    assert code == ExitCode.BAD_INPUT, (out, err)
    said = " ".join(err.split())
    first, second = sorted((hosts.a.name, hosts.b.name))
    assert f"instance 'both-1' is on several hosts: {first}, {second}; name one with --host" in said
    code, out, err = await hosts.a.cli("status", "both-1", "--json")
    assert code == ExitCode.BAD_INPUT  # and no rebuild of it is known on any host
    assert "no rebuild of both-1 is known on any host" in json.loads(out)["error"]


async def test_a_host_without_a_worker_is_reported_within_seconds(hosts: TwoHosts, client: Client) -> None:
    ghost = f"ghost-{uuid.uuid4().hex[:6]}"
    within = DEFAULT_ANSWER_WITHIN_SECONDS
    began = time.monotonic()
    report = await list_instances(client, [hosts.a.name, ghost])
    in_process = time.monotonic() - began
    assert report.silent_hosts == [ghost], report.hosts
    assert {row.instance for row in report.instances} == {"web-1", "web-2", "both-1"}
    assert in_process < within + 3, f"a host without a worker held the listing {in_process:.1f} s"
    await record_fleet_history(await newest_listing(client), "instances-one-host-silent")
    # The CLI: what a host without a worker adds to a listing is its answer time, not a long wait.
    began = time.monotonic()
    code, _, err = await hosts.a.cli("instances", "--host", hosts.a.name)
    answered = time.monotonic() - began
    assert code == ExitCode.OK, err
    began = time.monotonic()
    code, out, err = await hosts.a.cli("instances", "--host", hosts.a.name, "--host", ghost)
    took = time.monotonic() - began
    print(f"\nlisting with a silent host in process: {in_process:.2f} s; CLI: {answered:.2f} s, {took:.2f} s")
    assert code == ExitCode.BAD_INPUT, (out, err)
    assert row_of(out, hosts.a.name, "web-2")[2] == "running"
    assert f"host {ghost}: no worker answered within {within:g} s" in err
    assert took - answered < within + 5, f"{took:.1f} s with a silent host, {answered:.1f} s without"


async def test_the_api_lists_instances_in_the_callers_scope_only(hosts: TwoHosts, client: Client) -> None:
    a, b = hosts.a.name, hosts.b.name
    scoped = ApiClients.parse(f"web {WEB_TOKEN} hosts={a} instances=web-* verbs=start\n")
    async with serve_api(client, scoped) as api:
        response = await api.get("/v1/instances", headers={"Authorization": f"Bearer {WEB_TOKEN}"})
        assert response.status == 200
        shown = await response.json()
        assert {(r["host"], r["instance"]) for r in shown["instances"]} == {(a, "web-1"), (a, "web-2")}
        assert [h["host"] for h in shown["hosts"]] == [a]
        refused = await api.get(f"/v1/instances?host={b}", headers={"Authorization": f"Bearer {WEB_TOKEN}"})
        assert refused.status == 403
