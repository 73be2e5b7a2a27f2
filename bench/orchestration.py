"""What Temporal itself costs: one rebuild with instant activities, and a worker's start.

.venv/bin/python -m bench.orchestration [--quick]
"""

from __future__ import annotations

import asyncio
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter

from bench.common import BIN, QUICK, table, timed
from devtools.temporal_dev import DevServer, free_port
from devtools.testbed.fake_host import FakeHost, request_for, running_workers
from workflows.models import rebuild_workflow_id
from workflows.rebuild import RebuildInstance

RUNS = 5 if QUICK else 20


async def rebuild_times(address: str) -> tuple[list[float], list[float]]:
    """End-to-end time of each rebuild, and the time its activities themselves ran (from history)."""
    client = await Client.connect(address, data_converter=pydantic_data_converter)
    fake = FakeHost()
    times, in_activities = [], []
    async with running_workers(client, "bench", fake) as queue:
        for run in range(RUNS):
            request = request_for("bench", instance=f"vm-{run}")
            with timed() as took:
                await client.execute_workflow(
                    RebuildInstance.run,
                    request,
                    id=rebuild_workflow_id("bench", request.instance),
                    task_queue=queue,
                )
            times.append(took[0])
            history = await client.get_workflow_handle(
                rebuild_workflow_id("bench", request.instance)
            ).fetch_history()
            started = {}
            spent = 0.0
            for event in history.events:
                if event.HasField("activity_task_started_event_attributes"):
                    started[event.event_id] = event.event_time.ToDatetime()
                if event.HasField("activity_task_completed_event_attributes"):
                    begin = started[event.activity_task_completed_event_attributes.started_event_id]
                    spent += (event.event_time.ToDatetime() - begin).total_seconds()
            in_activities.append(spent)
    return times, in_activities


def worker_start(address: str, state: Path) -> float:
    began = time.perf_counter()
    worker = subprocess.Popen(
        [str(BIN / "rebuild-worker"), "--host", "bench-start", "--libvirt-uri", "test:///default",
         "--state-dir", str(state), "--address", address],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    # The worker logs to stderr; it is ready when it says so (a process that died says so too).
    assert worker.stderr is not None
    for line in worker.stderr:
        if b"worker ready" in line:
            break
    else:
        raise SystemExit(f"bench.orchestration: the worker exited ({worker.wait()}) before it was ready")
    took = time.perf_counter() - began
    worker.terminate()
    worker.wait()
    return took


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="bench-orchestration-") as tmp:
        server = DevServer(Path(tmp) / "t.db", free_port(), free_port(), Path(tmp) / "t.log")
        server.start()
        try:
            times, in_activities = asyncio.run(rebuild_times(server.address))
            starts = [worker_start(server.address, Path(tmp) / "state") for _ in range(3)]
        finally:
            server.stop()
    median = statistics.median(times)
    activities = 9
    table(
        "Orchestration on the Temporal dev server",
        [
            (f"one rebuild, {activities} instant activities (median of {RUNS})", f"{median:.2f} s",
             f"activities ran {statistics.median(in_activities) * 1000:.0f} ms",
             f"{median / activities * 1000:.0f} ms per step (<= 1 s total)"),
            ("worker start to first poll (best of 3)", f"{min(starts):.2f} s", "—", "(<= 2 s)"),
        ],
    )  # fmt: skip


if __name__ == "__main__":
    main()
