"""The FleetRebuild workflow on the real dev server, with simulated hosts on libvirt's test driver.

Every child is the real RebuildInstance running the real host activities (real qemu-img, real disk
files); failures are injected at the boot check, so a failed child really rolls its disk back. The
schedule itself (batches, limits, the budget, pause, batch size, selection) is tested without a server
on the pure plan (tests/test_fleet_plan.py); these tests show the workflow keeps it on real hosts.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from temporalio.client import Client, WorkflowFailureError, WorkflowHandle
from temporalio.exceptions import ApplicationError

from devtools.temporal_dev import DevServer, stop_process
from devtools.testbed.fleet import Gate, SimulatedFleet, simulated_fleet
from starter.errors import RebuildAlreadyRunning
from starter.rebuilds import start_rebuild
from tests.history_recorder import record_fleet_history
from workflows.fleet_models import (
    ControlAnswer,
    FleetAbort,
    FleetInstances,
    FleetReport,
    FleetStatus,
    FleetTarget,
    InstancesPage,
    InstanceState,
)

# Whole fleets rolled through real workers and activities: minutes, so `make unit` leaves them out.
pytestmark = pytest.mark.fleet


async def report_of(handle: WorkflowHandle[Any, Any]) -> FleetReport:
    return FleetReport.model_validate(await asyncio.wait_for(handle.result(), 240))


async def status_of(handle: WorkflowHandle[Any, Any]) -> FleetStatus:
    status: FleetStatus = await handle.query("status", result_type=FleetStatus)
    return status


async def instances_of(handle: WorkflowHandle[Any, Any]) -> FleetInstances:
    page: FleetInstances = await handle.query("instances", InstancesPage(), result_type=FleetInstances)
    return page


async def until(predicate: Any, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.1)


def on_new_image(fleet: SimulatedFleet) -> list[str]:
    return [vm.name for host, vm in fleet.all_instances() if fleet.image_of(host, vm) == fleet.sha256]


async def test_rolls_in_batches_within_the_unavailability_and_per_host_limits(
    client: Client, unique_host: str, tmp_path: Path
) -> None:
    async with simulated_fleet(client, tmp_path, unique_host, hosts=3, per_host=4) as fleet:
        handle = await fleet.start(
            fleet.request("limits", batch_size=6, max_unavailable=4, per_host=2, max_failures=5)
        )
        report = await report_of(handle)
        order = [item.instance for item in (await instances_of(handle)).items]
        await record_fleet_history(handle, "fleet-rolling")

    assert report.counts.rebuilt == 12 and report.stop_reason is None
    assert sorted(on_new_image(fleet)) == sorted(vm.name for _, vm in fleet.all_instances())
    assert fleet.half_done() == []
    assert fleet.tracker.max_busy == 4, "the fleet did not use its unavailability allowance"
    assert max(fleet.tracker.max_busy_per_host.values()) == 2
    assert fleet.tracker.max_down <= 4 and max(fleet.tracker.max_down_per_host.values()) <= 2
    # Hosts are interleaved, so each batch of 6 holds two instances of each of the 3 hosts.
    assert [name.split("-")[1] for name in order[:6]] == ["0", "1", "2", "0", "1", "2"]
    # A batch begins only when the one before has finished: every stop of the second batch comes after
    # every stop of the first.
    stops = fleet.tracker.stops
    first, second = set(order[:6]), set(order[6:])
    assert max(i for i, name in enumerate(stops) if name in first) < min(
        i for i, name in enumerate(stops) if name in second
    )


async def test_failure_budget_stops_at_exactly_max_failures_and_leaves_nothing_half_done(
    client: Client, unique_host: str, tmp_path: Path
) -> None:
    failing = {f"vm-{h}-{i:04d}" for h in range(2) for i in (1, 3, 4, 6)}
    async with simulated_fleet(client, tmp_path, unique_host, hosts=2, per_host=10, failing=failing) as fleet:
        handle = await fleet.start(fleet.request("budget", batch_size=20, max_unavailable=4, max_failures=3))
        report = await report_of(handle)
        rolled_back = await handle.query(
            "instances", InstancesPage(state=InstanceState.ROLLED_BACK), result_type=FleetInstances
        )
        await record_fleet_history(handle, "fleet-failure-budget")

    assert report.counts.rolled_back == 3 and report.counts.failed == 0
    assert report.stop_reason == "failure budget spent: 3 of 3 failed"
    assert report.counts.running == 0
    assert report.counts.waiting > 0, "the fleet went on past its budget"
    assert {p.instance for p in report.problems} == {i.instance for i in rolled_back.items} <= failing
    assert all("failed its boot check" in (p.note or "") for p in report.problems)
    # Every instance is whole: running, on its new image or (rolled back, not started) on its old one.
    assert fleet.half_done() == []
    rebuilt = set(on_new_image(fleet))
    assert len(rebuilt) == report.counts.rebuilt and not rebuilt & failing


async def test_abort_rolls_back_running_rebuilds_and_starts_no_more(
    client: Client, unique_host: str, tmp_path: Path
) -> None:
    async with simulated_fleet(client, tmp_path, unique_host, hosts=1, per_host=6) as fleet:
        held = fleet.hosts[f"{unique_host}-h0"][0]
        fleet.gate = Gate(held.name)
        old_disk = held.disk.read_bytes()
        handle = await fleet.start(fleet.request("abort", batch_size=6, max_unavailable=1))
        await asyncio.wait_for(fleet.gate.reached.wait(), 60)

        # The fleet holds the instance's rebuild ID: a single rebuild of it is refused meanwhile.
        single = fleet.request("x").rebuild.request_for(
            FleetTarget(host=f"{unique_host}-h0", instance=held.name)
        )
        with pytest.raises(RebuildAlreadyRunning):
            await start_rebuild(client, single)

        answer = await handle.execute_update(
            "abort_fleet", FleetAbort(reason="wrong image", requested_by="test"), result_type=ControlAnswer
        )
        assert answer.accepted, answer.message
        assert "1 running rebuild(s) asked to roll back" in answer.message
        report = await report_of(handle)

    assert report.stop_reason == "aborted: wrong image (by test)"
    assert report.counts.aborted == 1 and report.counts.waiting == 5 and report.counts.rebuilt == 0
    assert held.disk.read_bytes() == old_disk
    assert fleet.half_done() == []
    assert on_new_image(fleet) == []


async def test_continues_as_new_before_the_history_grows_and_loses_nothing(
    client: Client, unique_host: str, tmp_path: Path
) -> None:
    async with simulated_fleet(client, tmp_path, unique_host, hosts=2, per_host=8) as fleet:
        request = fleet.request(
            "can", batch_size=5, max_unavailable=3, max_failures=5, history_event_limit=40
        )
        handle = await fleet.start(request)
        report = await report_of(handle)
        status = await status_of(handle)
        # The first run: its history ends in the continue-as-new, carrying every instance's state.
        first_run = client.get_workflow_handle(handle.id, run_id=handle.first_execution_run_id)
        await record_fleet_history(first_run, "fleet-first-run-continued-as-new")
    runs = [run async for run in client.list_workflows(f"WorkflowId = '{handle.id}'")]
    assert report.runs >= 3 and len(runs) == report.runs
    assert report.counts.rebuilt == 16 and len(set(on_new_image(fleet))) == 16
    # Each instance was rebuilt once: no run started a child its predecessor had already finished.
    assert sorted(fleet.tracker.stops) == sorted(vm.name for _, vm in fleet.all_instances())
    assert status.history_length < 200


async def test_prefetch_refuses_a_bad_image_before_any_instance_stops(
    client: Client, unique_host: str, tmp_path: Path
) -> None:
    async with simulated_fleet(client, tmp_path, unique_host, hosts=2, per_host=2) as fleet:
        request = fleet.request("prefetch", prefetch=True, sha256="00" * 32)
        handle = await fleet.start(request)
        with pytest.raises(WorkflowFailureError) as failed:
            await asyncio.wait_for(handle.result(), 120)
    cause = failed.value.cause
    assert isinstance(cause, ApplicationError) and cause.type == "FleetPrefetchFailed"
    assert "nothing was started" in cause.message
    assert fleet.tracker.stops == [] and fleet.inspected == []


def start_workflow_worker(address: str, queue: str, log: Path) -> subprocess.Popen[bytes]:
    """The fleet's workflow worker as its own process, so a test can SIGKILL it like a crashed host."""
    before = log.read_bytes().count(b"workflow worker ready") if log.exists() else 0
    with open(log, "ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "tests.workflow_worker", address, queue],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
        )
    deadline = time.monotonic() + 30
    while log.read_bytes().count(b"workflow worker ready") == before:
        if process.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"workflow worker did not start: {log.read_text()[-2000:]}")
        time.sleep(0.05)
    return process


async def test_a_worker_crash_mid_fleet_loses_nothing_and_keeps_the_limits(
    client: Client, dev_server: DevServer, unique_host: str, tmp_path: Path
) -> None:
    log = tmp_path / "workflow-worker.log"
    hosts = simulated_fleet(client, tmp_path, unique_host, hosts=3, per_host=6, workflow_worker=False)
    async with hosts as fleet:
        process = start_workflow_worker(dev_server.address, fleet.queue, log)
        try:
            request = fleet.request("crash", batch_size=9, max_unavailable=3, per_host=1, max_failures=3)
            handle = await fleet.start(request)

            async def some_rebuilt() -> bool:
                return (await status_of(handle)).counts.rebuilt >= 5

            await until(some_rebuilt)
            process.send_signal(signal.SIGKILL)
            process.wait()
            killed_at = len(fleet.tracker.stops)
            await asyncio.sleep(1)
            process = start_workflow_worker(dev_server.address, fleet.queue, log)
            report = await report_of(handle)
        finally:
            stop_process(process)
    assert killed_at < 18, "the crash came after the fleet was over"
    assert report.counts.rebuilt == 18 and report.stop_reason is None
    assert sorted(fleet.tracker.stops) == sorted(vm.name for _, vm in fleet.all_instances())
    assert fleet.tracker.max_busy <= 3 and max(fleet.tracker.max_busy_per_host.values()) == 1
    assert fleet.half_done() == []
    assert len(on_new_image(fleet)) == 18
