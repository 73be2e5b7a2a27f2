"""200 concurrent rebuilds on one worker: libvirt's test:/// driver, real qemu-img, one shared image.

Reference: one rebuild alone, in the same run. Also the event loop's lag while the 200 run (libvirt
calls must not block it) and the worker's memory.

    .venv/bin/python -m bench.scale [--quick]
"""

from __future__ import annotations

import asyncio
import hashlib
import resource
import statistics
import tempfile
import time
from pathlib import Path

from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.worker import Worker

from activities.state import StateDir
from bench.common import QUICK, MiB, table, timed
from devtools.guest import write_image
from devtools.temporal_dev import DevServer, free_port
from devtools.testbed.e2e import LOOPBACK_NETWORKS
from devtools.testbed.libvirt_test_driver import make_instances
from worker import WorkerConfig, host_activities
from workflows.models import RebuildRequest, host_task_queue, rebuild_workflow_id
from workflows.rebuild import RebuildInstance

COUNT = 40 if QUICK else 200
HOST = "bench-scale"


async def loop_lag(samples: list[float], stop: asyncio.Event) -> None:
    while not stop.is_set():
        began = time.perf_counter()
        await asyncio.sleep(0.01)
        samples.append(time.perf_counter() - began - 0.01)


async def rebuild(client: Client, queue: str, name: str, url: str, sha: str) -> float:
    with timed() as took:
        result = await client.execute_workflow(
            RebuildInstance.run,
            # running:0: the figure is orchestration under load, not the default few seconds' watch.
            RebuildRequest(
                instance=name,
                host=HOST,
                image_url=url,
                sha256=sha,
                stop_timeout_seconds=0,
                verify="running:0",
            ),
            id=rebuild_workflow_id(HOST, name),
            task_queue=queue,
        )
    assert result.outcome == "rebuilt", result
    return took[0]


async def run(workdir: Path, address: str) -> dict[str, float]:
    instances = make_instances(workdir, [f"vm-{n}" for n in range(COUNT + 1)])
    conn = instances[0].libvirt
    state = StateDir(workdir / "state")
    state.create()
    image = write_image(workdir / "image.qcow2", "image B", fmt="qcow2", size=64 * MiB)
    sha = hashlib.sha256(image.read_bytes()).hexdigest()
    image.rename(state.image_path(sha))  # shared and cached: the figure is orchestration + disks
    url = "http://images.invalid/image.qcow2"
    client = await Client.connect(address, data_converter=pydantic_data_converter)
    config = WorkerConfig(
        host=HOST, libvirt_uri=conn.uri, state_dir=state.root, allowed_image_networks=LOOPBACK_NETWORKS
    )
    queue = "bench-scale-wf"
    async with (
        Worker(client, task_queue=queue, workflows=[RebuildInstance], max_concurrent_workflow_tasks=200),
        Worker(
            client,
            task_queue=host_task_queue(HOST),
            activities=host_activities(config, conn),
            max_concurrent_activities=200,
        ),
    ):
        alone = await rebuild(client, queue, instances[0].name, url, sha)
        lag: list[float] = []
        stop = asyncio.Event()
        monitor = asyncio.create_task(loop_lag(lag, stop))
        with timed() as wall:
            latencies = await asyncio.gather(
                *(rebuild(client, queue, vm.name, url, sha) for vm in instances[1:])
            )
        stop.set()
        await monitor
    ordered = sorted(latencies)
    return {
        "alone": alone,
        "wall": wall[0],
        "p50": statistics.median(ordered),
        "p95": ordered[int(0.95 * (len(ordered) - 1))],
        "lag_p99": sorted(lag)[int(0.99 * (len(lag) - 1))],
        "lag_max": max(lag),
        "rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="bench-scale-", dir="/var/tmp") as tmp:
        server = DevServer(Path(tmp) / "t.db", free_port(), free_port(), Path(tmp) / "t.log")
        server.start()
        try:
            figures = asyncio.run(run(Path(tmp), server.address))
        finally:
            server.stop()
    f = figures
    table(
        f"{COUNT} concurrent rebuilds on one worker (test:/// driver, real qemu-img, cached image)",
        [
            (f"{COUNT} rebuilds, all succeeded", f"{COUNT / f['wall']:.1f} rebuilds/s, {f['wall']:.1f} s",
             f"one alone: {f['alone']:.2f} s", f"{f['wall'] / f['alone']:.1f}x one rebuild's time"),
            ("latency p50 / p95", f"{f['p50']:.2f} s / {f['p95']:.2f} s", f"one alone: {f['alone']:.2f} s",
             f"p50 {f['p50'] / f['alone']:.1f}x alone"),
            ("event loop lag p99 / max", f"{f['lag_p99'] * 1000:.1f} ms / {f['lag_max'] * 1000:.0f} ms", "—",
             "libvirt calls in threads"),
            ("worker (and client) peak memory", f"{f['rss_mib']:.0f} MiB", "—", "—"),
        ],
    )  # fmt: skip


if __name__ == "__main__":
    main()
