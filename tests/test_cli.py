"""The operator's CLI against the real dev server, with fake host activities behind it."""

from __future__ import annotations

import asyncio

import pytest
from temporalio.client import Client

from devtools.temporal_dev import DevServer
from tests.e2e_support import rebuild_cli
from tests.fake_host import FakeHost
from workflows.models import rebuild_workflow_id

URL = "http://images.invalid/new.qcow2"


async def wait_listed(address: str, *filters: str) -> list[dict[str, object]]:
    for _ in range(100):
        listed = await rebuild_cli(address, "list", *filters, "--json")
        assert listed.code == 0, listed.stderr
        rows: list[dict[str, object]] = listed.json()  # type: ignore[assignment]
        if rows:
            return rows
        await asyncio.sleep(0.1)
    raise AssertionError(f"nothing listed for {filters}")


async def test_approve_from_the_cli_and_find_it_by_phase(
    dev_server: DevServer, client: Client, unique_host: str, fake_host: FakeHost
) -> None:
    address = dev_server.address
    started = await rebuild_cli(
        address, "start", "vm-1", "--host", unique_host, "--image", URL, "--require-approval"
    )
    assert started.code == 0, started.stderr
    rows = await wait_listed(address, "--phase", "await-approval", "--host", unique_host, "--running")
    assert rows[0]["instance"] == "vm-1"
    assert rows[0]["workflow_id"] == rebuild_workflow_id(unique_host, "vm-1")

    approved = await rebuild_cli(address, "approve", "vm-1", "--host", unique_host, "--reason", "go")
    assert approved.code == 0, approved.stderr
    result = await client.get_workflow_handle(rebuild_workflow_id(unique_host, "vm-1")).result()
    assert result["outcome"] == "rebuilt"
    assert "stop_instance" in fake_host.calls


async def test_second_start_is_refused_with_one_clear_line(
    dev_server: DevServer, unique_host: str, fake_host: FakeHost
) -> None:
    address = dev_server.address
    args = ["start", "vm-2", "--host", unique_host, "--image", URL, "--require-approval"]
    assert (await rebuild_cli(address, *args)).code == 0
    again = await rebuild_cli(address, *args)
    assert again.code == 2
    workflow_id = rebuild_workflow_id(unique_host, "vm-2")
    assert again.stderr.strip().splitlines() == [
        f"rebuild: a rebuild of vm-2 on {unique_host} is already running "
        f"(workflow {workflow_id}); see: rebuild status vm-2 --host {unique_host}"
    ]
    aborted = await rebuild_cli(address, "abort", "vm-2", "--host", unique_host, "--reason", "test over")
    assert aborted.code == 0, aborted.stderr


@pytest.mark.parametrize("command", ["confirm", "revert", "approve", "abort"])
async def test_signals_to_no_rebuild_are_bad_input(
    dev_server: DevServer, unique_host: str, command: str
) -> None:
    extra = ["--reason", "x"] if command == "abort" else []
    done = await rebuild_cli(dev_server.address, command, "nothing-here", "--host", unique_host, *extra)
    assert done.code == 2
    assert "no rebuild of nothing-here" in done.stderr
    assert "Traceback" not in done.stderr


async def test_temporal_unreachable_is_exit_3(unique_host: str) -> None:
    done = await rebuild_cli("127.0.0.1:1", "status", "vm-1", "--host", unique_host)
    assert done.code == 3
    assert "cannot reach Temporal" in done.stderr
    assert "Traceback" not in done.stderr


async def test_watch_follows_a_rebuild_to_its_end(
    dev_server: DevServer, unique_host: str, fake_host: FakeHost
) -> None:
    address = dev_server.address
    args = ["start", "vm-3", "--host", unique_host, "--image", URL, "--require-approval"]
    assert (await rebuild_cli(address, *args)).code == 0
    watcher = asyncio.create_task(rebuild_cli(address, "watch", "vm-3", "--host", unique_host))
    await asyncio.sleep(1)
    assert not watcher.done()
    assert (await rebuild_cli(address, "approve", "vm-3", "--host", unique_host)).code == 0
    watched = await watcher
    assert watched.code == 0, watched.stderr
    assert "COMPLETED" in watched.stdout
    assert "await-approval" in watched.stdout
