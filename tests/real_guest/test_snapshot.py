"""The seed's story on the real Debian guest: snapshot it (quiesced by its agent), damage it, put it back.

The worker is killed while the guest's file systems are frozen: the retry thaws them first, and the
snapshot that then finishes is quiesced. A rebuild from it brings back the file written before it and
undoes the damage done after, on the same domain (UUID, MACs, data disk).
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from devtools.temporal_dev import DevServer
from devtools.testbed.e2e import Guest, WorkerProcess, rebuild_cli, wait_for_file
from devtools.testbed.real_guest import BOOT_SECONDS, SHARED_GUEST, agent, guest_exec, read_in_guest

pytestmark = [pytest.mark.timeout(2400), SHARED_GUEST]
KEPT = "/root/kept-by-the-snapshot"


def sh(guest: Guest, script: str) -> None:
    done = guest_exec(guest, "/bin/sh", "-c", script, timeout=120)
    assert done.code == 0, done.err


def freeze_status(guest: Guest) -> str:
    return str(agent(guest, {"execute": "guest-fsfreeze-status"}))


async def test_snapshot_damage_and_rebuild_from_the_snapshot(
    real_guest: Guest, real_worker: WorkerProcess, dev_server: DevServer
) -> None:
    guest, worker = real_guest, real_worker
    before = guest.identity()
    data_before = guest.data_disk.read_bytes()
    sh(guest, f"echo 'written before the snapshot' > {KEPT} && sync")

    assert worker.pause_dir is not None
    gate = worker.pause_dir / "snapshot.while-frozen"
    gate.touch()
    args = ("snapshot", "create", guest.name, "--host", worker.host, "--quiesce", "--json")
    creating = asyncio.create_task(rebuild_cli(dev_server.address, *args, timeout=900))
    await wait_for_file(worker.pause_dir / "snapshot.while-frozen.reached", timeout=300)
    assert freeze_status(guest) == "frozen"
    worker.kill()
    gate.unlink()
    worker.start()
    made = await creating
    assert made.code == 0, made.stdout + made.stderr
    record: dict[str, Any] = made.json()
    assert freeze_status(guest) == "thawed"
    assert record["consistency"] == "quiesced"
    assert record["frozen_ms"] is not None and record["frozen_ms"] < 10_000
    print(f"freeze window (freeze, backup begin, thaw): {record['frozen_ms']:.0f} ms")

    sh(guest, f"rm {KEPT} && echo damaged > /etc/motd && sync")
    rebuilt = await rebuild_cli(
        dev_server.address,
        "start", guest.name, "--snapshot", record["snapshot_id"], "--host", worker.host,
        "--stop-timeout", "120", "--verify", "agent", "--boot-timeout", str(BOOT_SECONDS), "--wait", "--json",
        timeout=1200,
    )  # fmt: skip
    assert rebuilt.code == 0, rebuilt.stdout + rebuilt.stderr
    assert rebuilt.json()["verified_by"] == "agent"
    assert read_in_guest(guest, KEPT) == "written before the snapshot\n"
    assert read_in_guest(guest, "/etc/motd") != "damaged\n"
    assert guest.identity() == before
    assert guest.data_disk.read_bytes() == data_before
