"""Prometheus metrics as Prometheus expects them, scraped from real workers.

One ``rebuild_`` prefix; counters end in ``_total``; outcomes and steps are labels; durations are
seconds with buckets from 10 ms to hours; every series of the project names the instance's host (not
the worker that ran the workflow task); a failed rollback (the outcome that must page someone) is
counted, and the alert rules, checked by promtool, page for that host.
"""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
from pathlib import Path

import aiohttp
from temporalio.client import Client, WorkflowFailureError
from temporalio.contrib.pydantic import pydantic_data_converter

from common.connection import connect
from common.metrics import DOWNTIME_BUCKETS_SECONDS, STEP_BUCKETS_SECONDS, prometheus_runtime
from devtools.image_server import ImageServer
from devtools.promtool import promtool
from devtools.temporal_dev import DevServer, free_port
from devtools.testbed.e2e import WorkerProcess, serve
from devtools.testbed.fake_host import FakeHost, request_for, running_workers
from devtools.testbed.libvirt_test_driver import make_instances
from workflows.metrics import COUNTERS, HISTOGRAMS
from workflows.models import WORKFLOW_TASK_QUEUE, RebuildRequest, rebuild_workflow_id
from workflows.rebuild import RebuildInstance

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][\w:]*)(?:\{(?P<labels>[^}]*)\})? (?P<value>\S+)$")


class Scrape:
    def __init__(self, text: str) -> None:
        self.text = text
        self.types: dict[str, str] = {}
        self.samples: list[tuple[str, dict[str, str], float]] = []
        for line in text.splitlines():
            if line.startswith("# TYPE "):
                _, _, name, kind = line.split()
                self.types[name] = kind
            elif line and not line.startswith("#"):
                match = SAMPLE.match(line)
                assert match, line
                labels = dict(re.findall(r'(\w+)="([^"]*)"', match["labels"] or ""))
                self.samples.append((match["name"], labels, float(match["value"])))

    def value(self, name: str, **labels: str) -> float:
        return sum(
            v for n, got, v in self.samples if n == name and all(got.get(k) == x for k, x in labels.items())
        )

    def labels(self, name: str) -> list[dict[str, str]]:
        return [got for n, got, _ in self.samples if n == name]


async def scrape(port: int) -> Scrape:
    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/metrics") as answer:
        assert answer.status == 200
        return Scrape(await answer.text())


class FailsRollbackToo(FakeHost):
    """Verify fails, and so does putting the old disk back: the rollback itself fails."""

    async def _enter(self, name: str) -> None:
        await super()._enter(name)
        if name == "restore_root_disk":
            from temporalio.exceptions import ApplicationError

            raise ApplicationError("backup is gone", type="BackupMissing", non_retryable=True)


async def rebuild_each(
    client: Client, host: str, runs: tuple[tuple[FakeHost, str], ...], dry_run: frozenset[str] = frozenset()
) -> None:
    """A rebuild of each instance on its fake host, one after the other, to its end (failed or not)."""
    for fake, instance in runs:
        async with running_workers(client, host, fake) as queue:
            handle = await client.start_workflow(
                RebuildInstance.run,
                request_for(host, instance=instance, dry_run=instance in dry_run),
                id=rebuild_workflow_id(host, instance),
                task_queue=queue,
            )
            with contextlib.suppress(WorkflowFailureError):
                await handle.result()


async def test_outcomes_are_counted_including_a_failed_rollback(
    dev_server: DevServer, unique_host: str
) -> None:
    port = free_port()
    # The worker that runs these workflow tasks is another machine than the instances' hypervisor:
    # the counts must still name the hypervisor (they named the workflow worker).
    runtime = prometheus_runtime(f"127.0.0.1:{port}", "workflow-worker")
    client: Client = await connect(dev_server.address, runtime=runtime)
    runs = ((FakeHost(fail_at="verify_instance"), "vm-bad"), (FakeHost(), "vm-ok"),
            (FailsRollbackToo(fail_at="verify_instance"), "vm-worse"))  # fmt: skip
    await rebuild_each(client, unique_host, runs)
    metrics = await scrape(port)
    assert metrics.value("rebuild_started_total", host=unique_host) == 3
    assert metrics.value("rebuild_finished_total", host=unique_host, outcome="rebuilt") == 1
    assert metrics.value("rebuild_finished_total", host=unique_host, outcome="rolled-back") == 1
    assert metrics.value("rebuild_finished_total", host=unique_host, outcome="rollback-failed") == 1
    assert metrics.types["rebuild_finished_total"] == "counter"
    ours = [labels for name, labels, _ in metrics.samples if name.startswith("rebuild_")]
    assert ours and {labels["host"] for labels in ours} == {unique_host}
    assert {labels["worker"] for labels in ours} == {"workflow-worker"}
    # Each ending's duration, and the downtime of the one that stopped and started its instance.
    assert metrics.value("rebuild_duration_seconds_count", outcome="rolled-back") == 1
    assert metrics.value("rebuild_downtime_seconds_count", host=unique_host, outcome="rebuilt") == 1
    assert metrics.value("rebuild_downtime_seconds_count", outcome="rolled-back") == 0


async def test_a_dry_run_is_counted_as_no_rebuild(dev_server: DevServer, unique_host: str) -> None:
    port = free_port()
    runtime = prometheus_runtime(f"127.0.0.1:{port}", "workflow-worker")
    client: Client = await connect(dev_server.address, runtime=runtime)
    runs = ((FakeHost(), "vm-plan"), (FakeHost(fail_at="check_image"), "vm-refused"), (FakeHost(), "vm-ok"))
    await rebuild_each(client, unique_host, runs, dry_run=frozenset({"vm-plan", "vm-refused"}))
    metrics = await scrape(port)
    # Only the real rebuild: the dry runs, planned or refused, and their steps are in no series.
    assert metrics.value("rebuild_started_total", host=unique_host) == 1
    assert metrics.value("rebuild_finished_total", host=unique_host) == 1
    assert metrics.value("rebuild_finished_total", host=unique_host, outcome="rebuilt") == 1
    assert metrics.value("rebuild_step_seconds_count", host=unique_host, step="inspect") == 1
    assert metrics.value("rebuild_step_seconds_count", host=unique_host, step="plan") == 0


async def test_a_real_worker_serves_conventional_metrics(
    tmp_path: Path, images: ImageServer, unique_host: str
) -> None:
    # Its own Temporal: the session's shared workflow queue has in-process workers whose metrics
    # would not be this worker's.
    server = DevServer(tmp_path / "t.db", free_port(), free_port(), tmp_path / "t.log")
    server.start()
    port = free_port()
    (vm,) = make_instances(tmp_path, ["vm-1"])
    worker = WorkerProcess(
        host=unique_host,
        state_dir=tmp_path / "state",
        address=server.address,
        log=tmp_path / "worker.log",
        extra_args=(
            "--libvirt-uri",
            vm.libvirt.uri,
            "--metrics",
            f"127.0.0.1:{port}",
            "--log-format",
            "json",
        ),
    )
    try:
        worker.start()
        client = await Client.connect(server.address, data_converter=pydantic_data_converter)
        url, sha = serve(images, "image B", "qcow2", size=8 << 20)
        image_bytes = (images.directory / "image-B.qcow2").stat().st_size
        for instance in ("vm-1", "vm-missing"):
            handle = await client.start_workflow(
                RebuildInstance.run,
                RebuildRequest(
                    instance=instance, host=unique_host, image_url=url, sha256=sha, stop_timeout_seconds=0
                ),
                id=rebuild_workflow_id(unique_host, instance),
                task_queue=WORKFLOW_TASK_QUEUE,
            )
            with contextlib.suppress(WorkflowFailureError):
                await handle.result()
        metrics = await scrape(port)
    finally:
        worker.stop()
        server.stop()

    assert metrics.value("rebuild_started_total") == 2
    assert metrics.value("rebuild_finished_total", outcome="rebuilt") == 1
    assert metrics.value("rebuild_finished_total", outcome="unchanged") == 1
    assert metrics.value("rebuild_image_download_bytes_total", host=unique_host) == image_bytes
    # Every counter, the SDK's and ours, ends in _total; no millisecond series are left.
    counters = [name for name, kind in metrics.types.items() if kind == "counter"]
    assert counters and all(name.endswith("_total") for name in counters), counters
    assert not [name for name in metrics.types if name.endswith(("_ms", "_milliseconds"))]
    # Our series carry the host, the SDK's the worker; the step histogram has buckets from 10 ms to
    # hours, in seconds.
    ours = [(n, labels) for n, labels, _ in metrics.samples if n.startswith("rebuild_")]
    assert {n.removesuffix("_total") for n, _ in ours} >= set(COUNTERS)
    assert {n for n in metrics.types if n.startswith("rebuild_")} == {
        *(f"{name}_total" for name in COUNTERS),
        *HISTOGRAMS,
    }
    assert {labels.get("host") for _, labels in ours} == {unique_host}
    sdk = [labels for n, labels, _ in metrics.samples if n.startswith("temporal_")]
    assert sdk and {labels.get("worker") for labels in sdk} == {unique_host}
    assert not [labels for labels in sdk if "host" in labels]
    downtime = {labels["le"] for labels in metrics.labels("rebuild_downtime_seconds_bucket")}
    assert len(downtime) == len(DOWNTIME_BUCKETS_SECONDS) + 1
    assert metrics.types["rebuild_step_seconds"] == "histogram"
    bounds = {
        labels["le"]
        for labels in metrics.labels("rebuild_step_seconds_bucket")
        if labels["step"] == "prepare"
    }
    assert {"0.01", "3600", "+Inf"} <= bounds
    assert len(bounds) == len(STEP_BUCKETS_SECONDS) + 1
    # prepare takes milliseconds: it lands below one second, not in the first or last bucket.
    assert metrics.value("rebuild_step_seconds_bucket", step="prepare", le="1") == 1
    # Its log is one JSON object a line; the workflow's lines carry the workflow's identity.
    entries = [json.loads(line) for line in (tmp_path / "worker.log").read_text().splitlines()]
    # Its context in fields (issue 26, point 3), the message as written: no dict appended to it.
    phases = [e for e in entries if e.get("workflow_id") == handle.id]
    failed = [e for e in phases if e.get("phase") == "failed"]
    assert [e["message"] for e in failed] == [f"vm-missing on {unique_host}: phase failed"]
    assert failed[0]["instance"] == "vm-missing" and failed[0]["host"] == unique_host
    assert failed[0]["run_id"] == handle.result_run_id and failed[0]["attempt"] == 1
    assert {e["level"] for e in entries} <= {"debug", "info", "warning", "error"}
    # Every series the Grafana dashboard and the alert rules query is one this worker serves (the two
    # outcome counters it does not cause here are checked by the test above).
    served = set(metrics.types) | {
        f"{name}_{part}" for name in metrics.types for part in ("bucket", "sum", "count")
    }
    served |= {"up"}
    for path in (
        ROOT / "deploy" / "grafana" / "durable-rebuild.json",
        ROOT / "deploy" / "prometheus" / "rebuild-alerts.yml",
    ):
        text = path.read_text()
        exprs = (
            [target["expr"] for panel in json.loads(text)["panels"] for target in panel["targets"]]
            if path.suffix == ".json"
            else [text]
        )
        used = {
            name
            for expr in exprs
            for name in re.findall(r"\b(rebuild\w*_(?:total|bucket|count|sum)|temporal_\w+|up)\b", expr)
        }
        assert used, path
        assert used <= served, (path.name, used - served)
    # The SDK's own durations are seconds too, and say so.
    assert metrics.types["temporal_activity_execution_latency_seconds"] == "histogram"
    assert metrics.types["temporal_workflow_endtoend_latency_seconds"] == "histogram"


def test_the_alert_rules_load_and_page_for_the_host_whose_rollback_failed() -> None:
    """promtool, Prometheus's own checker: the rules parse, and their unit tests (the page names the
    host whose rollback failed; a clean rollback elsewhere pages nobody) pass."""
    rules = ROOT / "deploy" / "prometheus"
    tool = str(promtool())
    checked = subprocess.run(
        [tool, "check", "rules", str(rules / "rebuild-alerts.yml")], capture_output=True, text=True
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = subprocess.run(
        [tool, "test", "rules", str(rules / "rebuild-alerts.test.yml")], capture_output=True, text=True
    )
    assert tested.returncode == 0, tested.stdout + tested.stderr
