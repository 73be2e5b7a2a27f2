"""Status under load: GET /v1/rebuilds/{host}/{instance} through the real API process, many at once.

A running rebuild (answered by the workflow's status query, through the worker) and a finished one
(answered from its result and search attributes), the finished one also with no worker polling at all.

.venv/bin/python -m bench.status_load [--quick]
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.worker import Worker

from bench.common import BIN, QUICK, table
from devtools.temporal_dev import DevServer, free_port, stop_process
from devtools.testbed.fake_host import FakeHost
from workflows.models import WORKFLOW_TASK_QUEUE, host_task_queue
from workflows.rebuild import RebuildInstance

REQUESTS = 400 if QUICK else 2000
CONCURRENCY = 50
HOST = "bench-host"
TOKEN = "bench-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


async def serve_fake_host(address: str) -> None:
    """The worker, in its own process as on a real host (activities are instant fakes)."""
    client = await Client.connect(address, data_converter=pydantic_data_converter)
    fake = FakeHost()
    async with (
        Worker(client, task_queue=WORKFLOW_TASK_QUEUE, workflows=[RebuildInstance]),
        Worker(client, task_queue=host_task_queue(HOST), activities=fake.activities()),
    ):
        print("worker ready", flush=True)
        await asyncio.Event().wait()


async def load(api: str, path: str) -> tuple[list[float], float, int]:
    """REQUESTS GETs, CONCURRENCY at a time: latencies, the wall time, and the non-200 count."""
    latencies: list[float] = []
    failures = 0
    remaining = iter(range(REQUESTS))
    connector = aiohttp.TCPConnector(limit=CONCURRENCY)
    async with aiohttp.ClientSession(api, connector=connector, headers=AUTH) as http:

        async def one_client() -> None:
            nonlocal failures
            for _ in remaining:
                began = time.perf_counter()
                async with http.get(path) as answer:
                    await answer.read()
                    failures += answer.status != 200
                latencies.append(time.perf_counter() - began)

        began = time.perf_counter()
        await asyncio.gather(*(one_client() for _ in range(CONCURRENCY)))
        return latencies, time.perf_counter() - began, failures


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def start(
    command: list[str], log: Path, marker: bytes, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=out, stdin=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + 60
    while marker not in log.read_bytes():
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{command[0]} did not start: {log.read_text()[-2000:]}")
        time.sleep(0.05)
    return process


async def main() -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        state = Path(tmp)
        server = DevServer(state / "t.db", free_port(), free_port(), state / "t.log")
        server.start()
        worker = api = None
        try:
            worker = start([sys.executable, "-m", "bench.status_load", "--worker", server.address],
                           state / "worker.log", b"worker ready")  # fmt: skip
            (state / "tokens").write_text(f"bench {TOKEN}\n")
            # The API refuses a tokens file others can read (issue 24, finding 12).
            (state / "tokens").chmod(0o600)
            port = free_port()
            env = {**os.environ, "TEMPORAL_ADDRESS": server.address, "REBUILD_API_PORT": str(port),
                   "REBUILD_API_TOKENS_FILE": str(state / "tokens")}  # fmt: skip
            api = start([str(BIN / "rebuild-api")], state / "api.log", b"listening", env)
            base = f"http://127.0.0.1:{port}"
            async with aiohttp.ClientSession(base, headers=AUTH) as http:
                body = {"host": HOST, "image_url": "http://images.invalid/a.qcow2"}
                for instance, extra in (("vm-done", {}), ("vm-running", {"require_approval": True})):
                    async with http.post("/v1/rebuilds", json={**body, "instance": instance, **extra}) as r:
                        assert r.status == 201, await r.text()
                for instance, phase in (("vm-done", "done"), ("vm-running", "await-approval")):
                    for _ in range(200):
                        async with http.get(f"/v1/rebuilds/{HOST}/{instance}") as r:
                            shown = await r.json()
                        if shown.get("status") and shown["status"]["phase"] == phase:
                            break
                        await asyncio.sleep(0.05)
                    else:
                        raise RuntimeError(f"{instance} never reached {phase}: {shown}")
            cases = [("running rebuild (status query through the worker)", "vm-running"),
                     ("finished rebuild (result + search attributes)", "vm-done")]  # fmt: skip
            for label, instance in cases:
                cpu = cpu_seconds(api.pid), os.times()
                latencies, wall, failed = await load(base, f"/v1/rebuilds/{HOST}/{instance}")
                rows.append(figures(label, latencies, wall, failed))
                api_ms = (cpu_seconds(api.pid) - cpu[0]) / REQUESTS * 1000
                mine = os.times()
                load_ms = (mine.user + mine.system - cpu[1].user - cpu[1].system) / REQUESTS * 1000
                rows.append(
                    ("  CPU per request", f"API {api_ms:.2f} ms", f"load generator {load_ms:.2f} ms", "")
                )
            stop_process(worker)
            worker = None
            latencies, wall, failed = await load(base, f"/v1/rebuilds/{HOST}/vm-done")
            rows.append(figures("finished rebuild, no worker polling", latencies, wall, failed))
        finally:
            stop_process(api)
            stop_process(worker)
            server.stop()
    table(
        f"GET a rebuild's status: {REQUESTS} requests, {CONCURRENCY} concurrent, real rebuild-api process",
        rows,
    )


def figures(label: str, latencies: list[float], wall: float, failed: int) -> tuple[str, str, str, str]:
    p50, p99 = percentile(latencies, 0.50) * 1000, percentile(latencies, 0.99) * 1000
    value = f"p50 {p50:.0f} ms, p99 {p99:.0f} ms, max {max(latencies) * 1000:.0f} ms"
    reference = f"{len(latencies) / wall:.0f} req/s, {failed} not 200"
    return (label, value, reference, "p99 < 100 ms " + ("✓" if p99 < 100 and not failed else "✗"))


if __name__ == "__main__":
    if "--worker" in sys.argv:
        asyncio.run(serve_fake_host(sys.argv[sys.argv.index("--worker") + 1]))
    else:
        asyncio.run(main())
        sys.stdout.flush()
        os._exit(0)
