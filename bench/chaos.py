"""Chaos: N rebuilds of one real guest while the worker is SIGKILLed at random moments.

After each rebuild the invariant is checked: the guest runs, and its last boot printed the new image's
marker (rebuilt) or the previous one (rolled back); no backup, overlay or partial download is left.
Anything else counts as lost. Prints a table; exits non-zero if anything was lost.

    .venv/bin/python -m bench.chaos --rebuilds 20
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import libvirt
from temporalio.client import Client, WorkflowFailureError
from temporalio.contrib.pydantic import pydantic_data_converter

from activities.state import StateDir
from devtools.image_server import ImageServer
from devtools.reachable import reachable_dir
from devtools.temporal_dev import DevServer, free_port
from devtools.testbed.e2e import LIBVIRT_URI, Guest, WorkerProcess, make_guest, serve
from workflows.models import WORKFLOW_TASK_QUEUE, RebuildRequest, rebuild_workflow_id
from workflows.rebuild import RebuildInstance


@dataclass
class Tally:
    rebuilds: int = 0
    kills: int = 0
    finished: int = 0
    rolled_back: int = 0
    lost: int = 0


async def kill_at_random(worker: WorkerProcess, rng: random.Random, tally: Tally, window: float) -> None:
    await asyncio.sleep(rng.uniform(0, window))
    worker.kill()
    tally.kills += 1
    worker.start()


async def run(rebuilds: int, kill_probability: float, seed: int, workdir: Path) -> Tally:
    rng = random.Random(seed)
    tally = Tally()
    current = "gen 0"
    # Everything started here is stopped on the way out, whichever step failed: the host is left as
    # it was found (no dev server, worker or domain outlives the run).
    async with contextlib.AsyncExitStack() as cleanup:
        server = DevServer(workdir / "t.db", free_port(), free_port(), workdir / "temporal.log")
        cleanup.callback(server.stop)
        server.start()
        worker = WorkerProcess("chaos", workdir / "state", server.address, workdir / "worker.log")
        cleanup.callback(worker.stop)
        worker.start()
        images = ImageServer(workdir / "served")
        images.directory.mkdir()
        cleanup.push_async_callback(images.stop)
        await images.start()
        conn = libvirt.open(LIBVIRT_URI)
        cleanup.callback(conn.close)
        guests = workdir / "guests"
        guests.mkdir()
        guest = make_guest(conn, guests, "gen 0")
        cleanup.callback(guest.remove)
        client = await Client.connect(server.address, data_converter=pydantic_data_converter)
        for number in range(1, rebuilds + 1):
            marker = f"gen {number}"
            url, sha = serve(images, marker, "raw", size=8 << 20)
            request = RebuildRequest(
                instance=guest.name,
                host=worker.host,
                image_url=url,
                sha256=sha,
                stop_timeout_seconds=0,
                boot_marker=marker,
                boot_timeout_seconds=20,
            )
            handle = await client.start_workflow(
                RebuildInstance.run,
                request,
                id=rebuild_workflow_id(worker.host, guest.name),
                task_queue=WORKFLOW_TASK_QUEUE,
            )
            tally.rebuilds += 1
            chaos = None
            if rng.random() < kill_probability:
                chaos = asyncio.create_task(kill_at_random(worker, rng, tally, window=3.0))
            outcome = "rebuilt"
            try:
                await asyncio.wait_for(handle.result(), 300)
            except WorkflowFailureError:
                outcome = "rolled-back"
            if chaos:
                await chaos
            expected = marker if outcome == "rebuilt" else current
            if invariant_holds(guest, expected, worker.state_dir):
                current = expected
                tally.finished += outcome == "rebuilt"
                tally.rolled_back += outcome == "rolled-back"
            else:
                tally.lost += 1
                current = last_marker(guest.console())
            print(f"  rebuild {number:3}: {outcome:11} console ends with {last_marker(guest.console())!r}")
    return tally


def last_marker(console: str) -> str:
    lines = [line.strip() for line in console.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def invariant_holds(guest: Guest, expected: str, state_dir: Path) -> bool:
    deadline = time.monotonic() + 20
    while last_marker(guest.console()) != expected and time.monotonic() < deadline:
        time.sleep(0.1)
    partials = list(StateDir(state_dir).partial.glob("*.part"))
    return (
        bool(guest.domain.isActive())
        and last_marker(guest.console()) == expected
        and guest.leftovers() == []
        and partials == []
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rebuilds", type=int, default=20)
    parser.add_argument("--kill-probability", type=float, default=0.7)
    parser.add_argument("--seed", type=int, default=int(time.time()))
    args = parser.parse_args()
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    print(f"chaos: {args.rebuilds} rebuilds, kill probability {args.kill_probability}, seed {args.seed}")
    began = time.monotonic()
    with reachable_dir("chaos-") as workdir:
        tally = asyncio.run(run(args.rebuilds, args.kill_probability, args.seed, Path(workdir)))
    print()
    print("| rebuilds | kills | finished | rolled back | lost | seconds |")
    print("| --- | --- | --- | --- | --- | --- |")
    print(
        f"| {tally.rebuilds} | {tally.kills} | {tally.finished} | {tally.rolled_back} | {tally.lost} "
        f"| {time.monotonic() - began:.0f} |"
    )
    sys.stdout.flush()
    os._exit(1 if tally.lost else 0)


if __name__ == "__main__":
    main()
