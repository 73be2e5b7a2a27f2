"""``rebuild fleet`` as an operator runs it, against simulated hosts (libvirt's test driver)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import pytest
from temporalio.client import Client

from devtools.temporal_dev import DevServer
from devtools.testbed.e2e import rebuild_cli
from devtools.testbed.fleet import IMAGE_URL, simulated_fleet
from starter.cli_context import Cli
from starter.fleet_cli import _print_description
from starter.fleets import FleetDescription, budget_window
from workflows.fleet_models import FleetCounts, FleetLimits, FleetPhase, FleetStatus
from workflows.models import WORKFLOW_TASK_QUEUE


@pytest.mark.fleet
async def test_fleet_cli_starts_waits_reports_and_skips_on_a_rerun(
    client: Client, dev_server: DevServer, unique_host: str, tmp_path: Path
) -> None:
    hosts = simulated_fleet(client, tmp_path, unique_host, hosts=2, per_host=3, queue=WORKFLOW_TASK_QUEUE)
    async with hosts as fleet:
        h0, h1 = list(fleet.hosts)
        listing = tmp_path / "instances.txt"
        listing.write_text(f"# canary first\n{h0} vm-0-0000\n{h1} vm-1-0002  # the db\n\n{h0} vm-0-0001\n")
        args = ["--image", IMAGE_URL, "--sha256", fleet.sha256, "--stop-timeout", "0"]
        name = f"cli-{unique_host}"
        first = await rebuild_cli(
            dev_server.address, "fleet", "start", *args, "--instances-file", str(listing),
            "--batch", "2", "--max-unavailable", "2", "--max-failures", "1", "--pause-between", "0.2s",
            "--name", name, "--wait", "--json",
        )  # fmt: skip
        status = await rebuild_cli(dev_server.address, "fleet", "status", name, "--all", "--json")
        again = await rebuild_cli(
            dev_server.address, "fleet", "start", *args, "--select", "vm-*", "--host", h0, "--host", h1,
            "--max-unavailable", "3", "--max-failures", "2", "--name", f"{name}-all", "--wait", "--json",
        )  # fmt: skip
        listed = await rebuild_cli(dev_server.address, "fleet", "list", "--json")
        paused = await rebuild_cli(dev_server.address, "fleet", "pause", name)
        unknown = await rebuild_cli(dev_server.address, "fleet", "status", "no-such-fleet")
        human = await rebuild_cli(dev_server.address, "fleet", "status", f"{name}-all")

    assert first.code == 0, first.stderr
    report = first.json()["report"]
    assert report["counts"]["rebuilt"] == 3 and report["stop_reason"] is None
    assert status.code == 0, status.stderr
    states = {(i["host"], i["instance"]): i["state"] for i in status.json()["instances"]}
    assert states == {
        (h0, "vm-0-0000"): "rebuilt",
        (h1, "vm-1-0002"): "rebuilt",
        (h0, "vm-0-0001"): "rebuilt",
    }
    assert again.code == 0, again.stderr
    counts = again.json()["report"]["counts"]
    assert counts["skipped"] == 3 and counts["rebuilt"] == 3
    assert name in {row["name"] for row in json.loads(listed.stdout)}
    assert paused.code == 2 and "is not running" in paused.stderr
    assert unknown.code == 2 and "no fleet named no-such-fleet" in unknown.stderr
    assert "6 of 6 done: 3 rebuilt" in human.stdout and "3 skipped" in human.stdout


async def test_fleet_cli_exits_1_when_the_failure_budget_stops_it(
    client: Client, dev_server: DevServer, unique_host: str, tmp_path: Path
) -> None:
    hosts = simulated_fleet(
        client, tmp_path, unique_host, hosts=1, per_host=4, failing={"vm-0-0000"}, queue=WORKFLOW_TASK_QUEUE
    )
    async with hosts as fleet:
        (h0,) = list(fleet.hosts)
        result = await rebuild_cli(
            dev_server.address, "fleet", "start", "--image", IMAGE_URL, "--sha256", fleet.sha256,
            "--stop-timeout", "0", "--select", "vm-*", "--host", h0, "--max-failures", "1",
            "--name", f"fail-{unique_host}", "--wait",
        )  # fmt: skip
    assert result.code == 1, result.stderr
    assert "stopped: failure budget spent: 1 of 1 failed" in result.stdout
    assert "rolled-back: vm-0-0000" in result.stdout
    assert fleet.half_done() == []


def _status(max_unavailable: int, batch_size: int, max_failures: int, failures: int) -> FleetStatus:
    return FleetStatus(
        name="f",
        phase=FleetPhase.ROLLING,
        paused=False,
        image="http://images.invalid/new.qcow2",
        limits=FleetLimits(batch_size=batch_size, max_unavailable=max_unavailable, max_failures=max_failures),
        counts=FleetCounts(total=100, waiting=90, running=3, failed=failures),
        batch_number=0,
        batches=1,
        running=[],
        problems=[],
    )


def test_fleet_status_says_when_the_failure_budget_narrows_the_window() -> None:
    said: list[str] = []
    cli = cast(Cli, SimpleNamespace(say=said.append))
    narrowed = _status(max_unavailable=20, batch_size=50, max_failures=5, failures=2)
    assert budget_window(narrowed) == 3
    described = FleetDescription(workflow_id="fleet:f", workflow_status="RUNNING", status=narrowed)
    described.budget_window = 3
    _print_description(cli, described)
    assert "  running 3 at a time: the failure budget leaves 3 (2 of 5 failure(s) used; " in "\n".join(said)
    # Not narrower than the limits: nothing to explain; nor where the budget may be overshot.
    assert budget_window(_status(max_unavailable=3, batch_size=50, max_failures=10, failures=0)) is None
    assert budget_window(_status(max_unavailable=20, batch_size=2, max_failures=5, failures=2)) is None
    overshoot = _status(max_unavailable=20, batch_size=50, max_failures=5, failures=2)
    lifted = overshoot.limits.model_copy(update={"exact_budget": False})
    overshoot = overshoot.model_copy(update={"limits": lifted})
    assert budget_window(overshoot) is None
