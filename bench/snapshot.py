"""Snapshot of a running instance: what it costs the instance (nothing: it runs on) and how long it takes,
against the same bytes copied by ``qemu-img convert`` from the stopped disk, and against Nova's cold
snapshot order (stop, copy, start), on a real libvirtd guest with a disk of real data, in one run.

The guest's state is sampled every 5 ms while the snapshot runs: any sample not "running" would be
downtime. Boot-sector guests have no agent, so the freeze window is measured on the real Debian guest
(``tests/real_guest/test_snapshot.py`` prints it with the record).

    .venv/bin/python -m bench.snapshot [--quick]
"""

from __future__ import annotations

import asyncio
import shutil
import statistics
import subprocess
import threading

import libvirt
from temporalio.testing import ActivityEnvironment

from activities.libvirt_domain import Libvirt
from activities.snapshot_store import SnapshotStore
from activities.snapshots import SnapshotActivities
from activities.state import StateDir
from bench.common import QUICK, GiB, MiB, random_file, table, timed
from devtools.guest import boot_sector
from devtools.reachable import reachable_dir
from devtools.testbed.e2e import LIBVIRT_URI, make_guest
from workflows.snapshot_models import TakeSnapshotInput

SIZE = 256 * MiB if QUICK else GiB
RUNS = 2 if QUICK else 5


class StateSampler:
    """Samples the domain's state in a thread; counts the samples in which it was not running."""

    def __init__(self, domain: object) -> None:
        self.domain = domain
        self.samples = 0
        self.not_running = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            state, _ = self.domain.state()  # type: ignore[attr-defined]
            self.samples += 1
            self.not_running += state != libvirt.VIR_DOMAIN_RUNNING

    def __enter__(self) -> StateSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


async def main() -> None:
    conn = libvirt.open(LIBVIRT_URI)
    with reachable_dir("bench-snapshot-") as workdir:
        guest = make_guest(conn, workdir, "image A")
        random_file(guest.disk, SIZE)
        with open(guest.disk, "r+b") as disk:
            disk.write(boot_sector("image A"))
        guest.domain.destroy()
        guest.domain.create()
        state = StateDir(workdir / "state")
        state.create()
        activities = SnapshotActivities(Libvirt(LIBVIRT_URI), state, "bench")
        env = ActivityEnvironment()
        ours: list[float] = []
        convert: list[float] = []
        cold: list[float] = []
        downtime_samples = samples = 0
        try:
            for run in range(RUNS):
                request = TakeSnapshotInput(snapshot_id=f"{run:032x}", instance=guest.name, host="bench")
                with StateSampler(guest.domain) as sampler, timed() as took:
                    record = await env.run(activities.take_snapshot, request)
                ours.append(took[0])
                downtime_samples += sampler.not_running
                samples += sampler.samples
                SnapshotStore(state).delete(record.snapshot_id, set())

                copy = workdir / "reference.qcow2"
                with timed() as nova:
                    guest.domain.destroy()
                    with timed() as copied:
                        subprocess.run(
                            [
                                "qemu-img",
                                "convert",
                                "-q",
                                "-f",
                                "raw",
                                "-O",
                                "qcow2",
                                str(guest.disk),
                                str(copy),
                            ],
                            check=True,
                        )
                    guest.domain.create()
                convert.append(copied[0])
                cold.append(nova[0])
                copy.unlink()
        finally:
            guest.remove()
            shutil.rmtree(state.root, ignore_errors=True)
    snap, conv, nova_s = (statistics.median(x) for x in (ours, convert, cold))
    table(
        f"Snapshot of a running instance, {SIZE // MiB} MiB of data, median of {RUNS}",
        [
            ("instance downtime, ours", f"{downtime_samples} of {samples} samples not running",
             f"Nova's cold order: {nova_s:.2f} s down", "0 s (goal: 0)"),
            ("snapshot total time", f"{snap:.2f} s", f"qemu-img convert (stopped): {conv:.2f} s",
             f"{snap / conv:.2f}×"),  # noqa: RUF001 - the multiplication sign, as printed
            ("snapshot total time", f"{snap:.2f} s", f"Nova's cold order (stop, copy, start): {nova_s:.2f} s",
             f"{snap / nova_s:.2f}×"),  # noqa: RUF001
        ],
    )  # fmt: skip


if __name__ == "__main__":
    asyncio.run(main())
