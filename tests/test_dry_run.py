"""Issue 25, point 10: ``rebuild start --dry-run`` plans a rebuild and touches nothing.

The workflow with fake activities (which steps a dry run runs, its history), then the CLI as a
subprocess at 80 columns and the HTTP API against the dev server and a worker whose host activities are
the real ones on libvirt's ``test:///`` driver: the domain's definition, its metadata, its disk files
and its state are the same after a dry run as before.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from typing import Any

from aiohttp.test_utils import TestClient
from temporalio.client import Client

from common.exit_codes import ExitCode
from devtools.image_server import ImageServer
from devtools.testbed.e2e import serve
from devtools.testbed.fake_host import SHA, FakeHost, request_for
from tests.api_support import AUTH
from tests.driver_hosts import DriverHost
from tests.history_recorder import record_history
from tests.test_cli_first_hour import driver_host as driver_host  # the fixture, reused
from tests.test_ui_details import ui_details
from tests.workflow_support import failure_of, rebuilding
from workflows.dry_run import downtime, identity_changes
from workflows.identity import IdentityChange
from workflows.models import InstanceInfo, Outcome, Phase
from workflows.rebuild import RebuildInstance

PLAN_PATH = ["inspect_instance", "fetch_image", "check_image", "plan_root_disk"]


async def test_a_dry_run_runs_the_steps_before_the_stop_and_ends_with_a_plan(
    client: Client, unique_host: str
) -> None:
    fake = FakeHost()
    # Asking for approval and a confirm window changes nothing in a dry run: it waits for neither.
    async with rebuilding(
        client, unique_host, fake, dry_run=True, require_approval=True, confirm_within_seconds=60
    ) as handle:
        result = await handle.result()
        status = await handle.query(RebuildInstance.status)
        details = await ui_details(handle)
        await record_history(handle, "rebuild-dry-run")
    assert fake.calls == PLAN_PATH
    assert result.outcome == Outcome.PLANNED
    assert result.plan is not None and status.plan == result.plan
    assert (status.phase, status.outcome) == (Phase.PLANNED, Outcome.PLANNED)
    assert "nothing changed" in (status.summary or "")
    assert result.plan.image.sha256 == SHA
    assert result.plan.root_disk.mode == "overlay"
    assert result.plan.downtime.graceful_stop_bound_seconds == 60
    assert any("waits up to 3600 s for approve" in note for note in result.plan.notes)
    assert status.undo_stack == []
    assert "phase **planned**" in details and "outcome: **planned (dry run), nothing changed**" in details
    assert "plan: root disk vda (file, raw) by overlay" in details


async def test_a_dry_run_that_fails_a_check_fails_as_the_rebuild_would_with_nothing_to_undo(
    client: Client, unique_host: str
) -> None:
    fake = FakeHost(fail_at="check_image", error_type="UnsafeImage")
    async with rebuilding(client, unique_host, fake, dry_run=True) as handle:
        error, result = await failure_of(handle)
        status = await handle.query(RebuildInstance.status)
    assert fake.calls == ["inspect_instance", "fetch_image", "check_image"]
    assert "nothing was changed" in error.message
    assert (result.outcome, result.error_type, result.plan) == (Outcome.UNCHANGED, "UnsafeImage", None)
    assert status.phase == Phase.FAILED


async def test_a_dry_run_asked_for_pre_flight_boots_the_sandbox_and_reports_it(
    client: Client, unique_host: str
) -> None:
    fake = FakeHost()
    async with rebuilding(client, unique_host, fake, dry_run=True, preflight=True, verify="agent") as handle:
        result = await handle.result()
    assert fake.calls == [*PLAN_PATH[:3], "preflight_image", PLAN_PATH[3]]
    assert result.plan is not None
    assert "pre-flight: booted in a sandbox, verified by agent: sandbox booted" in result.plan.checks


async def test_a_dry_run_whose_pre_flight_fails_fails_before_the_plan_with_nothing_to_undo(
    client: Client, unique_host: str
) -> None:
    fake = FakeHost(fail_at="preflight_image", error_type="PreflightFailed")
    async with rebuilding(client, unique_host, fake, dry_run=True, preflight=True) as handle:
        error, result = await failure_of(handle)
    assert fake.calls == [*PLAN_PATH[:3], "preflight_image"]
    assert "failed at preflight" in error.message and "nothing was changed" in error.message
    assert (result.outcome, result.error_type) == (Outcome.UNCHANGED, "PreflightFailed")


def test_identity_changes_name_what_changes_and_never_a_secret() -> None:
    change = IdentityChange(
        hostname="web-1",
        ssh_keys=(),
        user_data="#cloud-config\npassword: hunter2\n",
        admin_password_hash="$6$salt$" + "x" * 86,
    )
    said = identity_changes(change, has_identity=True)
    digest = hashlib.sha256(b"#cloud-config\npassword: hunter2\n").hexdigest()
    assert said == [
        "hostname: web-1",
        "SSH keys: removed",
        f"user data: 32 bytes, sha256 {digest}",
        "admin password: set",
    ]
    assert "hunter2" not in repr(said) and "$6$" not in repr(said)
    assert identity_changes(None, has_identity=False) == []
    assert identity_changes(None, has_identity=True) == [
        "seed renewed with the identity the instance has (no change)"
    ]


def test_the_downtime_is_the_stops_bound_and_none_for_an_instance_that_is_off() -> None:
    def info(running: bool) -> InstanceInfo:
        return InstanceInfo(
            name="vm-1", uuid="u", was_running=running, root_disk_path="/d", root_disk_format="raw",
            root_disk_target="vda",
        )  # fmt: skip

    running = downtime(request_for("h", stop_timeout_seconds=30), info(True))
    assert (running.graceful_stop_bound_seconds, running.starts_after) == (30, True)
    assert "up to 30 s" in running.estimate and "unknown until measured" in running.estimate
    kept_off = downtime(request_for("h", start_after=False), info(True))
    assert (kept_off.starts_after, kept_off.estimate.endswith("and stays off")) == (False, True)
    off = downtime(request_for("h"), info(False))
    assert off.graceful_stop_bound_seconds is None
    assert off.estimate == "none: the instance is off and stays off"


def _snapshot(host: DriverHost, name: str) -> dict[str, Any]:
    """Everything a dry run must leave as it was: definitions, state, and the files beside the disk."""
    instance = next(i for i in host.instances if i.name == name)
    domain = instance.libvirt.connection().lookupByName(name)
    files = {p.name: p.read_bytes() for p in sorted(instance.disk.parent.iterdir()) if p.is_file()}
    return {
        "xml": domain.XMLDesc(0),
        "inactive": domain.XMLDesc(2),  # VIR_DOMAIN_XML_INACTIVE
        "state": domain.state(),
        "files": {k: hashlib.sha256(v).hexdigest() for k, v in files.items()},
    }


async def test_cli_dry_run_prints_the_plan_at_80_columns_and_leaves_the_instance_as_it_was(
    driver_host: DriverHost, images: ImageServer
) -> None:
    url, sha = serve(images, "image B", "qcow2")
    host = driver_host.name
    before = _snapshot(driver_host, "vm-1")
    code, out, err = await driver_host.cli(
        "start", "vm-1", "--host", host, "--image", url, "--sha256", sha, "--dry-run", "--hostname", "web-1"
    )
    assert code == ExitCode.OK, (out, err)
    assert _snapshot(driver_host, "vm-1") == before
    assert before["state"][0] == 1  # still running
    disk = driver_host.instances[0].disk
    assert out.startswith(f"dry run of vm-1 on {host}: nothing changed (running, as before)\n")
    for said in (
        "  root disk: vda (file, raw, 1 MiB)\n",
        f"    at {disk}\n",
        "  new disk: overlay, 4 MiB\n",
        f"  image: {url}\n",
        f"    sha256 {sha}\n",
        "    qcow2, 4 MiB virtual, downloaded now, cached for it\n",
        "    hostname: web-1\n",
        "  downtime: the graceful stop (up to 60 s, then forced off), the swap and the\n",
        "    pre-flight: not run",
    ):
        assert said in out, said
    for line in out.splitlines():
        assert len(line) <= 80 or str(disk) in line, line

    # Again, as JSON: the plan model; the image is in the cache now, and nothing changed still.
    code, out, err = await driver_host.cli(
        "start", "vm-1", "--host", host, "--image", url, "--sha256", sha, "--dry-run", "--json",
        "--disk-mode", "copy",
    )  # fmt: skip
    assert code == ExitCode.OK, (out, err)
    plan = json.loads(out)
    assert plan["root_disk"]["mode"] == "copy (full)"  # a qcow2 image for a raw disk: no reflink
    assert (plan["root_disk"]["target"], plan["root_disk"]["path"]) == ("vda", str(disk))
    assert (plan["image"]["sha256"], plan["image"]["cached_before"]) == (sha, True)
    assert plan["identity_changes"] == []
    assert _snapshot(driver_host, "vm-1") == before

    # status of the finished dry run shows its plan.
    code, out, err = await driver_host.cli("status", "vm-1", "--host", host)
    assert code == ExitCode.OK, err
    assert "  phase: planned\n" in out
    assert "  plan (dry run; a rebuild would):\n" in out
    assert "    new disk: copy (full), 4 MiB\n" in out


async def test_dry_runs_refused_as_the_rebuild_would_be_with_the_same_exit_code_and_nothing_changed(
    driver_host: DriverHost, images: ImageServer
) -> None:
    url, _ = serve(images, "image B", "qcow2")
    host = driver_host.name
    before = {name: _snapshot(driver_host, name) for name in ("vm-1", "vm-2")}
    # vm-2's root disk is a block device no pool manages: refused at inspect, exit 2.
    code, out, err = await driver_host.cli("start", "vm-2", "--host", host, "--image", url, "--dry-run")
    assert code == ExitCode.BAD_INPUT, (out, err)
    assert "/dev/sdz, which belongs to no libvirt storage pool" in err
    # A wrong checksum fails the fetch: the real run's exit code, whatever it is.
    wrong = ["--image", url, "--sha256", "0" * 64, "--stop-timeout", "0"]
    code, out, err = await driver_host.cli("start", "vm-1", "--host", host, *wrong, "--dry-run")
    real, _, real_err = await driver_host.cli("start", "vm-1", "--host", host, *wrong, "--wait")
    assert code == real == ExitCode.FAILED, (err, real_err)
    assert "SHA-256" in err and "nothing was changed" in err
    assert {name: _snapshot(driver_host, name) for name in ("vm-1", "vm-2")} == before


async def test_the_api_starts_a_dry_run_and_its_status_carries_the_plan(
    driver_host: DriverHost, images: ImageServer, api: TestClient[Any, Any]
) -> None:
    url, sha = serve(images, "image B", "qcow2")
    host = driver_host.name
    before = _snapshot(driver_host, "vm-1")
    body = {"host": host, "instance": "vm-1", "image_url": url, "sha256": sha, "dry_run": True}
    started = await api.post("/v1/rebuilds", json=body, headers=AUTH)
    assert started.status == 201, await started.text()
    for _ in range(300):
        answer = await (await api.get(f"/v1/rebuilds/{host}/vm-1", headers=AUTH)).json()
        if answer["workflow_status"] != "RUNNING":
            break
        await asyncio.sleep(0.1)
    assert answer["workflow_status"] == "COMPLETED", answer
    assert answer["result"]["outcome"] == "planned"
    assert answer["status"]["plan"] == answer["result"]["plan"]
    assert answer["result"]["plan"]["root_disk"]["mode"] == "overlay"
    assert answer["result"]["plan"]["image"]["sha256"] == sha
    assert _snapshot(driver_host, "vm-1") == before
    schemas = (await (await api.get("/openapi.json")).json())["components"]["schemas"]
    assert schemas["RebuildRequest"]["properties"]["dry_run"]["default"] is False
    assert "RebuildPlan" in schemas


async def test_the_plan_gives_the_measured_downtime_of_the_hosts_last_rebuilds(
    driver_host: DriverHost, images: ImageServer, api: TestClient[Any, Any]
) -> None:
    url, sha = serve(images, "image B", "qcow2")
    host = driver_host.name
    image = ["--image", url, "--sha256", sha, "--stop-timeout", "0"]
    code, out, err = await driver_host.cli("start", "vm-1", "--host", host, *image, "--wait", "--json")
    assert code == ExitCode.OK, (out, err)
    downtime = json.loads(out)["downtime_seconds"]
    code, out, err = await driver_host.cli("start", "vm-1", "--host", host, *image, "--dry-run", "--json")
    assert code == ExitCode.OK, (out, err)
    measured = json.loads(out)["downtime"]
    assert (measured["measured_median_seconds"], measured["measured_rebuilds"]) == (downtime, 1)
    answer = await (await api.get(f"/v1/rebuilds/{host}/vm-1", headers=AUTH)).json()
    assert answer["result"]["plan"]["downtime"]["measured_rebuilds"] == 1
    code, out, err = await driver_host.cli("start", "vm-1", "--host", host, *image, "--dry-run")
    assert code == ExitCode.OK, (out, err)
    assert f"    measured here: off to running in a median {downtime:.2f} s over the host's" in out
