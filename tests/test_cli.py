"""The operator's CLI against the real dev server, with fake host activities behind it."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import pytest
from temporalio.client import Client
from temporalio.service import RPCError
from temporalio.worker import Worker

from common.connection import worker_identity
from common.exit_codes import MEANING, ExitCode
from devtools.temporal_dev import DevServer
from devtools.testbed.e2e import BIN, rebuild_cli
from devtools.testbed.fake_host import FakeHost
from starter.rebuilds import UNCLAIMED_AFTER_SECONDS, describe_rebuild, query_status
from workflows.models import WORKFLOW_TASK_QUEUE, Phase, host_task_queue, rebuild_workflow_id
from workflows.rebuild import RebuildInstance

URL = "http://images.invalid/new.qcow2"


def held(instance: str, host: str) -> list[str]:
    """`rebuild start` of a rebuild that waits for approval: it runs until approved or aborted."""
    return ["start", instance, "--host", host, "--image", URL, "--require-approval"]


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
    started = await rebuild_cli(address, *held("vm-1", unique_host))
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
    assert (await rebuild_cli(address, *held("vm-2", unique_host))).code == 0
    again = await rebuild_cli(address, *held("vm-2", unique_host))
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
    assert (await rebuild_cli(address, *held("vm-3", unique_host))).code == 0
    watcher = asyncio.create_task(rebuild_cli(address, "watch", "vm-3", "--host", unique_host))
    await asyncio.sleep(1)
    assert not watcher.done()
    assert (await rebuild_cli(address, "approve", "vm-3", "--host", unique_host)).code == 0
    watched = await watcher
    assert watched.code == 0, watched.stderr
    assert "COMPLETED" in watched.stdout
    assert "await-approval" in watched.stdout


async def test_status_of_a_terminated_rebuild_is_exit_4(
    dev_server: DevServer, client: Client, unique_host: str, fake_host: FakeHost
) -> None:
    address = dev_server.address
    assert (await rebuild_cli(address, *held("vm-4", unique_host))).code == 0
    running = await rebuild_cli(address, "status", "vm-4", "--host", unique_host)
    assert running.code == 0, running.stderr
    await client.get_workflow_handle(rebuild_workflow_id(unique_host, "vm-4")).terminate("test")
    ended = await rebuild_cli(address, "status", "vm-4", "--host", unique_host)
    assert ended.code == ExitCode.ENDED_WITHOUT_RESULT
    assert "TERMINATED" in ended.stdout
    watched = await rebuild_cli(address, "watch", "vm-4", "--host", unique_host, "--json")
    assert watched.code == ExitCode.ENDED_WITHOUT_RESULT


async def test_watch_exits_as_start_wait_does_when_the_request_was_wrong(
    dev_server: DevServer, unique_host: str, fake_host: FakeHost
) -> None:
    fake_host.fail_at, fake_host.error_type = "inspect_instance", "InstanceNotFound"
    address, target = dev_server.address, ["vm-8", "--host", unique_host]
    waited = await rebuild_cli(address, "start", *target, "--image", URL, "--wait")
    watched = await rebuild_cli(address, "watch", *target)
    watched_json = await rebuild_cli(address, "watch", *target, "--json")
    status = await rebuild_cli(address, "status", *target)
    assert waited.code == ExitCode.BAD_INPUT, waited.stderr
    assert (watched.code, watched_json.code) == (waited.code, waited.code)
    assert watched_json.json()["result"]["error_type"] == "InstanceNotFound"
    assert status.code == ExitCode.FAILED  # the rebuild failed; `status` itself was asked nothing wrong


async def test_the_worker_exits_3_when_temporal_is_unreachable(tmp_path: Path) -> None:
    process = await asyncio.create_subprocess_exec(
        str(BIN / "rebuild-worker"),
        "--address", "127.0.0.1:1", "--host", "h1", "--state-dir", str(tmp_path), "--libvirt-uri", "test:///default",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == ExitCode.UNAVAILABLE
    assert "cannot reach Temporal" in err.decode()
    assert "Traceback" not in err.decode()


@pytest.mark.parametrize(
    "command",
    [
        ["rebuild", "--help"],
        ["rebuild", "status", "--help"],
        ["rebuild-worker", "--help"],
        ["rebuild-api", "--help"],
    ],
)
def test_every_command_shows_the_one_exit_code_table(command: list[str]) -> None:
    shown = subprocess.run([str(BIN / command[0]), *command[1:]], capture_output=True, text=True, check=True)
    text = " ".join(shown.stdout.split())
    for code, meaning in MEANING.items():
        assert f"{code.value}: {' '.join(meaning.split())[:40]}" in text, (code, shown.stdout)


def test_the_cli_docs_have_the_exit_code_table() -> None:
    """The table lives in docs/cli.md (the README is a front page that links it)."""
    cli_docs = (Path(__file__).parent.parent / "docs" / "cli.md").read_text()
    for code, meaning in MEANING.items():
        assert f"| {code.value} | {meaning} |" in cli_docs


async def test_a_host_without_a_worker_is_refused_with_the_hosts_that_have_one(
    dev_server: DevServer, client: Client, unique_host: str
) -> None:
    fake = FakeHost()
    identity = worker_identity(unique_host)
    async with (
        Worker(client, task_queue=WORKFLOW_TASK_QUEUE, workflows=[RebuildInstance], identity=identity),
        Worker(
            client, task_queue=host_task_queue(unique_host), activities=fake.activities(), identity=identity
        ),
    ):
        await asyncio.sleep(1)  # the server lists a poller once its first poll arrived
        wrong = f"{unique_host}-typo"
        refused = await rebuild_cli(dev_server.address, "start", "vm-5", "--host", wrong, "--image", URL)
    assert refused.code == ExitCode.BAD_INPUT
    assert f"no worker polls rebuild-host-{wrong}" in refused.stderr
    assert unique_host in refused.stderr.split("hosts with a worker:")[1]
    assert "Traceback" not in refused.stderr
    with pytest.raises(RPCError):
        await client.get_workflow_handle(rebuild_workflow_id(wrong, "vm-5")).describe()


async def test_a_rebuild_whose_host_worker_vanished_says_so_in_status(
    dev_server: DevServer, client: Client, unique_host: str
) -> None:
    fake = FakeHost()
    address = dev_server.address
    async with Worker(client, task_queue=WORKFLOW_TASK_QUEUE, workflows=[RebuildInstance]):
        async with Worker(client, task_queue=host_task_queue(unique_host), activities=fake.activities()):
            assert (await rebuild_cli(address, *held("vm-6", unique_host))).code == 0
            handle = client.get_workflow_handle(rebuild_workflow_id(unique_host, "vm-6"))
            for _ in range(100):
                if (await query_status(handle)).phase == Phase.AWAIT_APPROVAL:
                    break
                await asyncio.sleep(0.1)
        # The host's worker is gone; the rebuild goes on to stage the new disk and waits for it.
        assert (await rebuild_cli(address, "approve", "vm-6", "--host", unique_host)).code == 0
        described = await describe_rebuild(client, "vm-6", unique_host, unclaimed_after=1)
        assert described.waiting_for_worker is None  # not yet: a live worker would have taken it
        await asyncio.sleep(UNCLAIMED_AFTER_SECONDS + 1)
        status = await rebuild_cli(address, "status", "vm-6", "--host", unique_host)
        await handle.terminate("test over")
    assert status.code == 0, status.stderr
    assert f"no worker on host {unique_host}: stage_root_disk has waited" in status.stdout


async def test_verify_mode_reaches_the_host_and_the_result_says_how_it_stopped_and_verified(
    dev_server: DevServer, unique_host: str, fake_host: FakeHost
) -> None:
    done = await rebuild_cli(
        dev_server.address, "start", "vm-1", "--host", unique_host, "--image", URL,
        "--verify", "console:login:", "--wait", "--json",
    )  # fmt: skip
    assert done.code == 0, done.stderr
    assert (done.json()["stopped_by"], done.json()["verified_by"]) == ("acpi", "console:login:")
    status = await rebuild_cli(dev_server.address, "status", "vm-1", "--host", unique_host)
    assert "verify: console:login:" in status.stdout
    assert "stopped by: acpi" in status.stdout


async def test_a_bad_verify_mode_is_refused_before_anything_starts(dev_server: DevServer) -> None:
    refused = await rebuild_cli(dev_server.address, "start", "vm-1", "--image", URL, "--verify", "ping")
    assert refused.code == 2
    assert "agent, console:REGEX or running:SECONDS" in refused.stderr
