"""Pre-flight on real libvirtd guests: a broken image fails in a sandbox and the instance never stops.

Boot-sector guests (TCG) for speed: a good image prints its marker in the sandbox and the rebuild goes
on; an image that boots to nothing fails pre-flight with the sandbox's console in the error, the
instance running on with the same domain ID; a worker killed mid pre-flight leaves no sandbox after the
retry; a worker that starts removes sandboxes a crashed one left.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import libvirt
import pytest
from temporalio.client import Client

from activities.domain_xml.sandbox import SANDBOX_NAMESPACE
from activities.errors import BootCheckFailed
from activities.preflight import SANDBOX_PREFIX, verified_unless_fatal
from activities.state import StateDir
from devtools.guest import domain_xml, remove_domain, write_image
from devtools.image_server import ImageServer
from devtools.temporal_dev import DevServer
from devtools.testbed.e2e import Guest, WorkerProcess, rebuild_cli, serve, wait_for_file
from tests.history_recorder import record_history
from tests.test_faults import assert_nothing_left, assert_runs, handle_for, start_args
from workflows.models import VerifyResult


def sandboxes(conn: libvirt.virConnect, owner: WorkerProcess | None = None) -> list[str]:
    """The pre-flight sandboxes on the host; of ``owner``'s state directory only, where one is given
    (tests that run at the same time have their own)."""
    mark = None if owner is None else f"sandbox of {StateDir(owner.state_dir).root},"
    found = []
    for domain in conn.listAllDomains():
        if not domain.name().startswith(SANDBOX_PREFIX):
            continue
        try:
            description = ET.fromstring(domain.XMLDesc(0)).findtext("description") or ""
        except libvirt.libvirtError:
            continue  # a transient sandbox that went away after the listing
        if mark is None or mark in description:
            found.append(domain.name())
    return found


def sandbox_files(worker: WorkerProcess) -> list[str]:
    directory = StateDir(worker.state_dir).root / "preflight"
    return sorted(p.name for p in directory.glob(f"{SANDBOX_PREFIX}*")) if directory.exists() else []


async def test_a_good_image_passes_preflight_and_the_rebuild_completes(
    guest: Guest, worker: WorkerProcess, images: ImageServer, dev_server: DevServer, client: Client
) -> None:
    since = len(guest.console())
    url, sha = serve(images, "image B", "raw")
    result = await rebuild_cli(
        dev_server.address, *start_args(guest, worker, url, sha, "--preflight", "--wait", "--json")
    )
    assert result.code == 0, result.stdout + result.stderr
    assert "preflight" in result.json()["step_seconds"]
    await record_history(handle_for(client, worker, guest), "rebuild-with-preflight")
    assert_runs(guest, "image B", since)
    assert sandboxes(guest.conn, worker) == [] and sandbox_files(worker) == []
    assert_nothing_left(guest, worker)


async def test_a_broken_image_fails_preflight_and_the_instance_never_stops(
    guest: Guest, worker: WorkerProcess, images: ImageServer, dev_server: DevServer, client: Client
) -> None:
    domain_id = guest.domain.ID()
    boots = guest.console().count("image A")
    # A boot sector that prints something else and halts: it boots, but never as image B.
    url, sha = serve(images, "not the new image", "raw")
    result = await rebuild_cli(
        dev_server.address, *start_args(guest, worker, url, sha, "--preflight", "--wait")
    )
    assert result.code == 1, result.stdout + result.stderr
    assert "pre-flight boot" in result.stderr
    assert "the instance was never stopped" in result.stderr
    assert "not the new image" in result.stderr  # the sandbox's console, last lines
    assert "nothing was changed" in result.stderr
    await record_history(handle_for(client, worker, guest), "rebuild-failed-in-preflight")
    assert guest.domain.isActive() and guest.domain.ID() == domain_id
    assert guest.console().count("image A") == boots
    assert sandboxes(guest.conn, worker) == [] and sandbox_files(worker) == []
    assert_nothing_left(guest, worker)


async def test_a_worker_killed_during_preflight_leaves_no_sandbox(
    guest: Guest, worker: WorkerProcess, images: ImageServer, dev_server: DevServer, client: Client
) -> None:
    assert worker.pause_dir is not None
    gate = worker.pause_dir / "preflight.after-create"
    gate.touch()
    url, sha = serve(images, "image B", "raw")
    started = await rebuild_cli(dev_server.address, *start_args(guest, worker, url, sha, "--preflight"))
    assert started.code == 0, started.stderr
    await wait_for_file(worker.pause_dir / "preflight.after-create.reached")
    assert len(sandboxes(guest.conn, worker)) == 1
    worker.kill()
    gate.unlink()
    worker.start()
    result = await handle_for(client, worker, guest).result()
    assert result.outcome == "rebuilt"
    assert sandboxes(guest.conn, worker) == [] and sandbox_files(worker) == []


def test_a_starting_worker_removes_sandboxes_a_crashed_one_left(
    libvirt_conn: libvirt.virConnect, guest_dir: Path, worker: WorkerProcess
) -> None:
    state = StateDir(worker.state_dir)
    directory = state.root / "preflight"
    directory.mkdir(exist_ok=True)
    name = f"{SANDBOX_PREFIX}left-by-a-crash"
    disk = write_image(directory / f"{name}.qcow2", "orphan", fmt="qcow2")
    xml = domain_xml(name, disk, guest_dir / "orphan.log", root_format="qcow2").replace(
        "<devices>",
        f"<metadata><sandbox:owner xmlns:sandbox='{SANDBOX_NAMESPACE}'>durable-rebuild pre-flight "
        f"sandbox of {state.root}, removed after its check</sandbox:owner></metadata>\n  <devices>",
    )
    libvirt_conn.createXML(xml, 0)
    # Named like a sandbox and persistent (an operator's domain): never destroyed, never undefined.
    persistent = f"{SANDBOX_PREFIX}prod"
    libvirt_conn.defineXML(
        domain_xml(persistent, write_image(guest_dir / "p.img", "prod"), guest_dir / "p.log").replace(
            "<devices>", xml[xml.index("<metadata>") : xml.index("</metadata>") + 11] + "\n  <devices>"
        )
    )
    foreign = f"{SANDBOX_PREFIX}of-another-worker"
    libvirt_conn.createXML(
        domain_xml(foreign, write_image(guest_dir / "f.img", "foreign"), guest_dir / "f.log"), 0
    )
    try:
        worker.stop()
        worker.start()
        assert name not in sandboxes(libvirt_conn)
        assert not disk.exists()
        assert foreign in sandboxes(libvirt_conn)  # not this worker's: left alone
        assert libvirt_conn.lookupByName(persistent).isPersistent()
    finally:
        for leftover in (name, foreign):
            with contextlib.suppress(libvirt.libvirtError):
                libvirt_conn.lookupByName(leftover).destroy()
        remove_domain(libvirt_conn, persistent)


# --- a console that says the boot is over ends the check at once -----------------------------------


async def test_a_kernel_panic_on_the_console_fails_the_check_before_its_timeout(tmp_path: Path) -> None:
    console = tmp_path / "console.log"
    console.write_bytes(b"[    0.000000] Linux version 6.1.0\r\n")

    async def boot_then_panic() -> None:
        await asyncio.sleep(0.7)
        with open(console, "ab") as log:  # the line arrives in two writes, split mid-word
            log.write(b"[    9.1] Kernel panic - not syn")
            log.flush()
            await asyncio.sleep(0.8)
            log.write(b"cing: Attempted to kill init! exitcode=0x00000100\r\n[    9.2] Call Trace:\r\n")

    writer = asyncio.create_task(boot_then_panic())
    began = time.monotonic()
    with pytest.raises(BootCheckFailed) as failed:
        await verified_unless_fatal(asyncio.sleep(15), console)
    await writer
    assert time.monotonic() - began < 10
    assert "Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000100" in failed.value.message


async def test_without_a_fatal_line_the_verification_decides(tmp_path: Path) -> None:
    console = tmp_path / "console.log"
    console.write_bytes(b"panic=10 set on the command line; no kernel panic here\r\n")

    async def agent_answers() -> VerifyResult:
        await asyncio.sleep(1.2)
        return VerifyResult(verified_by="agent", detail="debian 12")

    assert await verified_unless_fatal(agent_answers(), console) == VerifyResult(
        verified_by="agent", detail="debian 12"
    )
    with pytest.raises(BootCheckFailed, match="no answer"):
        await verified_unless_fatal(_fails_after(0.3, BootCheckFailed("no answer")), console)


async def _fails_after(seconds: float, error: Exception) -> VerifyResult:
    await asyncio.sleep(seconds)
    raise error
