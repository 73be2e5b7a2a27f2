"""A fleet of 1,000 instances on 10 simulated hosts, 5 % of them failing, a failure budget of 20.

Each host is libvirt's test:/// driver with real disk files and its own worker running the real host
activities (real qemu-img); one dev server. Checked afterwards: the fleet stopped at exactly the budget,
no instance is half-done, and never more than K instances were down at once, from the children's own
histories (first stop scheduled to last start completed). Reference: the Temporal floor, a parent that
runs the same number of no-op children K at a time on the same server.

    .venv/bin/python -m bench.fleet [--quick]
"""

from __future__ import annotations

import asyncio
import logging
import random
import resource
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.worker import Worker

from bench.common import QUICK, table, timed
from bench.floor_workflows import FloorChild, FloorParent
from devtools.temporal_dev import DevServer, free_port
from devtools.testbed.fleet import down_interval, max_overlap, simulated_fleet
from workflows.fleet_models import FleetInstances, FleetReport, InstancesPage, InstanceState
from workflows.models import rebuild_workflow_id

HOSTS, PER_HOST = (5, 20) if QUICK else (10, 100)
FAILURE_RATE = 0.05
MAX_FAILURES = 3 if QUICK else 20
MAX_UNAVAILABLE = 10 if QUICK else 20
PER_HOST_LIMIT = 3
BATCH = 50 if QUICK else 100
CLEAN_PER_HOST = 10 if QUICK else 20


async def history_size(client: Client, workflow_id: str) -> tuple[int, int, int]:
    """Events and bytes over every run of ``workflow_id``, and the number of runs."""
    events = size = runs = 0
    async for execution in client.list_workflows(f"WorkflowId = '{workflow_id}'"):
        history = await client.get_workflow_handle(workflow_id, run_id=execution.run_id).fetch_history()
        events += len(history.events)
        size += sum(event.ByteSize() for event in history.events)
        runs += 1
    return events, size, runs


async def child_span(client: Client, workflow_id: str) -> tuple[float, int]:
    """A child's own duration (its first event to its last) and the length of its history."""
    events = (await client.get_workflow_handle(workflow_id).fetch_history()).events
    seconds = (events[-1].event_time.ToDatetime() - events[0].event_time.ToDatetime()).total_seconds()
    return seconds, len(events)


async def run_fleet(client: Client, root: Path, name: str, per_host: int, rate: float) -> dict[str, Any]:
    names = [f"vm-{h}-{i:04d}" for h in range(HOSTS) for i in range(per_host)]
    failing = set(random.Random(2026).sample(names, int(len(names) * rate)))
    root = root / name
    root.mkdir()
    async with simulated_fleet(
        client, root, name, hosts=HOSTS, per_host=per_host, failing=failing, disk_size=64 << 10
    ) as fleet:
        request = fleet.request(
            name,
            batch_size=BATCH,
            max_unavailable=MAX_UNAVAILABLE,
            per_host=PER_HOST_LIMIT,
            max_failures=MAX_FAILURES,
        )
        with timed() as wall:
            handle = await fleet.start(request)
            report = FleetReport.model_validate(await handle.result())
        page = await handle.query("instances", InstancesPage(limit=5000), result_type=FleetInstances)
        half_done = fleet.half_done()
        on_new = sum(1 for host, vm in fleet.all_instances() if fleet.image_of(host, vm) == fleet.sha256)
    ran = [i for i in page.items if i.state not in (InstanceState.WAITING, InstanceState.SKIPPED)]
    intervals = [
        interval
        for interval in await asyncio.gather(
            *(down_interval(client, rebuild_workflow_id(i.host, i.instance)) for i in ran)
        )
        if interval is not None
    ]
    events, size, runs = await history_size(client, handle.id)
    ids = [rebuild_workflow_id(i.host, i.instance) for i in ran]
    found = await asyncio.gather(*(child_span(client, workflow_id) for workflow_id in ids))
    spans = [seconds for seconds, _ in found]
    rebuilt = {rebuild_workflow_id(i.host, i.instance) for i in ran if i.state == InstanceState.REBUILT}
    return {
        "child_p50": statistics.median(spans),
        "child_events": statistics.median(n for (_, n), i in zip(found, ids, strict=True) if i in rebuilt),
        "in_flight": sum(spans) / wall[0],
        "report": report,
        "wall": wall[0],
        "children": len(ran),
        "max_down": max_overlap(intervals),
        "half_done": half_done,
        "on_new": on_new,
        "events": events,
        "bytes": size,
        "runs": runs,
        "tracker_max_busy": fleet.tracker.max_busy,
    }


async def run_floor(client: Client, children: int) -> dict[str, float]:
    queue = "bench-fleet-floor"
    workflows = [FloorParent, FloorChild]
    async with Worker(client, task_queue=queue, workflows=workflows, max_concurrent_workflow_tasks=100):
        with timed() as wall:
            await client.execute_workflow(
                FloorParent.run, [children, MAX_UNAVAILABLE], id="bench-floor", task_queue=queue
            )
    events, size, _ = await history_size(client, "bench-floor")
    _, child_events = await child_span(client, "bench-floor-0")
    return {"wall": wall[0], "events": events, "bytes": size, "child_events": child_events}


async def run(root: Path, address: str) -> tuple[dict[str, Any], dict[str, Any], dict[str, float]]:
    client = await Client.connect(address, data_converter=pydantic_data_converter)
    fleet = await run_fleet(client, root, "bench", PER_HOST, FAILURE_RATE)
    # The same limits with nothing failing: the budget never narrows the window below K.
    clean = await run_fleet(client, root, "clean", CLEAN_PER_HOST, 0.0)
    floor = await run_floor(client, fleet["children"])
    return fleet, clean, floor


def main() -> None:
    # Injected failures are expected: the SDK's warning for each would drown the figures.
    logging.getLogger("temporalio.activity").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory(prefix="bench-fleet-", dir="/var/tmp") as tmp:
        server = DevServer(Path(tmp) / "t.db", free_port(), free_port(), Path(tmp) / "t.log")
        server.start()
        try:
            fleet, clean, floor = asyncio.run(run(Path(tmp), server.address))
        finally:
            server.stop()
    report: FleetReport = fleet["report"]
    c = report.counts
    exact = c.failures == MAX_FAILURES
    assert exact, f"the fleet stopped at {c.failures} failures, not {MAX_FAILURES}"
    assert fleet["half_done"] == [], fleet["half_done"]
    assert fleet["on_new"] == c.rebuilt, (fleet["on_new"], c.rebuilt)
    assert fleet["max_down"] <= MAX_UNAVAILABLE, fleet["max_down"]
    assert clean["report"].counts.rebuilt == HOSTS * CLEAN_PER_HOST, clean["report"]
    assert clean["max_down"] <= MAX_UNAVAILABLE and clean["half_done"] == [], clean
    rate, floor_rate = fleet["children"] / fleet["wall"], fleet["children"] / floor["wall"]
    per_child, floor_per_child = fleet["events"] / fleet["children"], floor["events"] / fleet["children"]
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    total = HOSTS * PER_HOST
    table(
        f"Fleet of {total} instances on {HOSTS} simulated hosts (test:/// driver, real qemu-img), "
        f"{FAILURE_RATE:.0%} failing, K={MAX_UNAVAILABLE}, P={PER_HOST_LIMIT}, batch {BATCH}, "
        f"--max-failures {MAX_FAILURES}",
        [
            ("stopped at", f"{c.failures} failures ({c.rolled_back} rolled back)", f"budget {MAX_FAILURES}",
             "exactly the budget ✓" if exact else "✗"),
            ("outcome", f"{c.rebuilt} rebuilt, {c.waiting} not started, {c.running} running", "—",
             f"half-done: {len(fleet['half_done'])} ✓"),
            ("most instances down at once (children's histories)", str(fleet["max_down"]),
             f"K = {MAX_UNAVAILABLE}", "≤ K ✓"),
            ("rebuilds per second", f"{rate:.1f}/s ({fleet['children']} in {fleet['wall']:.0f} s)",
             f"floor: {floor_rate:.1f} no-op children/s", f"{rate / floor_rate:.2f}x the floor"),
            ("the same limits, nothing failing", f"{clean['children'] / clean['wall']:.1f}/s "
             f"({clean['children']} in {clean['wall']:.0f} s), {clean['in_flight']:.1f} in flight "
             f"on average, p50 {clean['child_p50']:.1f} s", f"floor: {floor_rate:.1f} no-op children/s",
             f"{clean['children'] / clean['wall'] / floor_rate:.2f}x the floor; most down at once: "
             f"{clean['max_down']}"),
            ("one rebuild (child workflow), p50", f"{fleet['child_p50']:.1f} s", "—",
             f"{fleet['in_flight']:.1f} rebuilds in flight on average (K = {MAX_UNAVAILABLE}, and never "
             "more than the failures left in the budget)"),
            ("one rebuilt child's history, median", f"{fleet['child_events']:.0f} events",
             f"floor: a no-op child's {floor['child_events']} events",
             f"{fleet['child_events'] / floor['child_events']:.1f}x the floor's"),
            ("parent's history",
             f"{fleet['events']} events, {fleet['bytes'] / 1024:.0f} KiB in {fleet['runs']} run(s)",
             f"floor: {floor['events']} events, {floor['bytes'] / 1024:.0f} KiB",
             f"{per_child:.1f} vs {floor_per_child:.1f} events per child"),
            (f"process memory ({HOSTS} host workers + workflow worker + client), peak", f"{rss:.0f} MiB",
             "—", "—"),
        ],
    )  # fmt: skip


if __name__ == "__main__":
    started = time.monotonic()
    main()
    print(f"\n(bench.fleet took {time.monotonic() - started:.0f} s)")
