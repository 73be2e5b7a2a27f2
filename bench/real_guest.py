"""Downtime of a real Debian guest (kernel, systemd, guest agent): our rebuild against the references.

One guest from ``devtools.real_guest`` (image A), in the same run:
- reference: a bare ``virsh shutdown`` + ``virsh start`` of the guest: graceful stop time, off → running,
  off → the guest agent answers;
- ours: the real workflow on the dev server rebuilds it to image B (download and check while it runs,
  graceful stop, prepare, start, verify by the agent);
- Nova's order (full mode only): graceful stop, then download and check, prepare, start, agent.

Quick mode (``BENCH_QUICK=1``) leaves out Nova's order: every boot of the real guest costs about a
minute under TCG.

    .venv/bin/python -m bench.real_guest [--quick]
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import libvirt
from temporalio.testing import ActivityEnvironment

from activities import libvirt_domain as ld
from activities.disks import DiskActivities
from activities.hypervisor import HypervisorActivities
from activities.images import ImageActivities
from activities.state import StateDir
from bench.common import QUICK, GiB, start_image_server, table, timed
from bench.rebuild_service import WORKFLOW_QUEUE, rebuild_service
from devtools import reachable
from devtools.real_guest import ensure_images, image_sha256
from devtools.real_guest_domain import overlay, real_domain_xml
from devtools.temporal_dev import free_port
from devtools.testbed.e2e import LIBVIRT_URI, LOOPBACK_POLICY
from workflows.models import (
    CheckImageInput,
    FetchImageInput,
    PrepareRootDiskInput,
    RebuildRequest,
    StartInstanceInput,
    StopInstanceInput,
    VerifyInstanceInput,
    rebuild_workflow_id,
)
from workflows.rebuild import RebuildInstance

BOOT_SECONDS = 300.0
STOP_SECONDS = 120.0


def wait_for_agent(conn: ld.Libvirt, name: str, timeout: float = BOOT_SECONDS) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            conn.domain(name).agent_command("guest-ping", 2)
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def virsh(*args: str) -> None:
    subprocess.run(["virsh", "-q", "-c", LIBVIRT_URI, *args], check=True, stdout=subprocess.DEVNULL)


def bare_virsh(conn: ld.Libvirt, name: str) -> tuple[float, float, float]:
    """(graceful stop, off → running, off → agent) for ``virsh shutdown`` then ``virsh start``."""
    with timed() as stop:
        virsh("shutdown", name)
        while conn.domain(name).is_active():
            time.sleep(0.05)
    off = time.perf_counter()
    virsh("start", name)
    running = time.perf_counter() - off
    wait_for_agent(conn, name)
    return stop[0], running, time.perf_counter() - off


async def ours(name: str, url: str, sha: str, workdir: Path) -> tuple[float, float, float, str]:
    """(stop step, off → running, off → agent) of the real workflow, and how the stop ended."""
    host = "bench-real"
    async with rebuild_service(workdir, host, workdir / "wf-state") as client:
        result = await client.execute_workflow(
            RebuildInstance.run,
            RebuildRequest(
                instance=name, host=host, image_url=url, sha256=sha,
                stop_timeout_seconds=STOP_SECONDS, verify="agent", boot_timeout_seconds=BOOT_SECONDS,
            ),
            id=rebuild_workflow_id(host, name),
            task_queue=WORKFLOW_QUEUE,
        )  # fmt: skip
    assert result.downtime_seconds is not None and result.stopped_by is not None
    # Verify starts one activity round trip after start returned: off → agent is the sum.
    agent = result.downtime_seconds + result.step_seconds["verify"]
    return result.step_seconds["stop"], result.downtime_seconds, agent, result.stopped_by


async def nova_order(name: str, url: str, sha: str, state_dir: Path) -> tuple[float, float]:
    """(off → running, off → agent) when the download happens while the instance is off."""
    conn = ld.Libvirt(LIBVIRT_URI)
    state = StateDir(state_dir)
    hypervisor, images, disks = (
        HypervisorActivities(conn, state=state),
        ImageActivities(state, address_policy=LOOPBACK_POLICY),
        DiskActivities(conn, state),
    )
    env = ActivityEnvironment()
    stopped = await env.run(
        hypervisor.stop_instance, StopInstanceInput(instance=name, timeout_seconds=STOP_SECONDS)
    )
    assert not stopped.forced
    off = time.perf_counter()
    cached = await env.run(images.fetch_image, FetchImageInput(url=url, sha256=sha, max_bytes=4 * GiB))
    image = await env.run(
        images.check_image, CheckImageInput(sha256=cached.sha256, max_virtual_size_bytes=4 * GiB)
    )
    await env.run(
        disks.prepare_root_disk,
        PrepareRootDiskInput(
            instance=name, image_sha256=image.sha256, image_format=image.format,
            image_virtual_size=image.virtual_size, original_format="qcow2", rebuild_id="bench-nova",
        ),
    )  # fmt: skip
    await env.run(hypervisor.start_instance, StartInstanceInput(instance=name, rebuild_id="bench-nova"))
    running = time.perf_counter() - off
    await env.run(
        hypervisor.verify_instance,
        VerifyInstanceInput(
            instance=name, verify="agent", boot_timeout_seconds=BOOT_SECONDS, rebuild_id="bench-nova"
        ),
    )
    conn.close()
    return running, time.perf_counter() - off


def main() -> None:
    images = ensure_images()
    conn = ld.Libvirt(LIBVIRT_URI)
    # QEMU's user reads the worker's image cache (the overlay's backing file): a reachable directory.
    workdir = reachable.make_dir("bench-real-guest-")
    name = f"bench-real-{uuid.uuid4().hex[:8]}"
    served = workdir / "served"
    served.mkdir()
    (served / "b.qcow2").symlink_to(images.b)
    (served / "a.qcow2").symlink_to(images.a)
    port = free_port()
    server = start_image_server(served, port)
    try:
        disk = overlay(images.a, workdir / f"{name}.qcow2")
        conn.connection().defineXML(real_domain_xml(name, disk, workdir / f"{name}.console.log"))
        began = time.perf_counter()
        conn.domain(name).start()
        wait_for_agent(conn, name)
        first_boot = time.perf_counter() - began
        ref_stop, ref_running, ref_agent = bare_virsh(conn, name)
        our_stop, our_running, our_agent, stopped_by = asyncio.run(
            ours(name, f"http://127.0.0.1:{port}/b.qcow2", image_sha256(images.b), workdir)
        )
        rows = [
            ("graceful stop (ours: ACPI, agent after a third of the timeout)", f"{our_stop:.1f} s "
             f"(by {stopped_by})", f"virsh shutdown: {ref_stop:.1f} s", f"{our_stop / ref_stop:.2f}x (~1)"),
            ("off → running", f"{our_running:.2f} s", f"virsh start: {ref_running:.2f} s",
             f"{our_running / ref_running:.2f}x (small)"),
            ("off → guest agent answers", f"{our_agent:.1f} s", f"virsh start: {ref_agent:.1f} s",
             f"{our_agent / ref_agent:.2f}x (~1)"),
        ]  # fmt: skip
        if not QUICK:
            nova_running, nova_agent = asyncio.run(
                nova_order(name, f"http://127.0.0.1:{port}/a.qcow2", image_sha256(images.a), workdir / "nova")
            )
            rows += [
                ("off → running, Nova's order (download while off)", f"{our_running:.2f} s (ours)",
                 f"Nova: {nova_running:.2f} s", f"{our_running / nova_running:.2f}x Nova (<= 0.2)"),
                ("off → agent, Nova's order", f"{our_agent:.1f} s (ours)", f"Nova: {nova_agent:.1f} s",
                 f"{our_agent / nova_agent:.2f}x Nova (< 1)"),
            ]  # fmt: skip
        print(f"first boot of the real guest to an answering agent: {first_boot:.1f} s (TCG)")
    finally:
        server.terminate()
        try:
            conn.with_domain(name, lambda d: (d.destroy() if d.isActive() else None, d.undefine()))
        except Exception as err:
            print(f"cleanup of {name}: {err}")
        conn.close()
        shutil.rmtree(workdir, ignore_errors=True)
    table(f"Real Debian guest ({images.b.stat().st_size >> 20} MiB qcow2), TCG, same run", rows)


if __name__ == "__main__":
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    # A CI timeout's SIGTERM must still run the cleanup: the guest and its directory go with the run.
    signal.signal(signal.SIGTERM, lambda _sig, _frame: sys.exit(143))
    main()
