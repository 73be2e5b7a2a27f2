"""Start-up: how long an operator waits for `rebuild --help`, `rebuild status` and a worker's "ready",
each against the same thing done by a reference in the same run.

- `rebuild --help` against the Go CLI's `temporal --help`, and the floors under it that are not ours:
  the interpreter alone, `import typer`, and a bare Typer app's `--help` (Typer renders help with rich).
- `rebuild status X` against `temporal workflow list` on a dev server, with the Python floor of a status
  (importing `temporalio.client`, connecting, one describe) beside it.
- `rebuild-worker` until it logs "worker ready" against a bare temporalio Worker (one workflow, one
  activity) until it prints the same, both on the same dev server.

Each figure is the median of RUNS runs, the runs of a pair alternated.

    .venv/bin/python -m bench.startup [--quick]
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from statistics import median

from bench.common import BIN, QUICK, table

RUNS = int(os.environ.get("BENCH_RUNS", "5" if QUICK else "15"))
PYTHON = sys.executable
BARE_TYPER_HELP = """
from typing import Annotated
import typer
app = typer.Typer()
@app.command()
def status(instance: str, host: Annotated[str, typer.Option(help="The host.")] = "h") -> None:
    '''Show a rebuild.'''
app(["--help"])
"""
PYTHON_STATUS = """
import asyncio, sys
from temporalio.client import Client
from temporalio.service import RPCError
async def main() -> None:
    client = await Client.connect(sys.argv[1])
    try:
        await client.get_workflow_handle("rebuild-h-x").describe()
    except RPCError:
        pass
asyncio.run(main())
"""
BARE_WORKER = """
import asyncio, sys
from temporalio import activity
from temporalio.client import Client
from temporalio.worker import Worker
from bench.floor_workflows import FloorChild
@activity.defn
async def nothing() -> None:
    pass
async def main() -> None:
    client = await Client.connect(sys.argv[1])
    async with Worker(client, task_queue="bench-bare", workflows=[FloorChild], activities=[nothing]):
        print("worker ready", flush=True)
        await asyncio.Event().wait()
asyncio.run(main())
"""


def seconds_of(command: list[str]) -> float:
    """Wall time of one run of ``command`` to its exit, output discarded."""
    began = time.perf_counter()
    subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    return time.perf_counter() - began


def seconds_to_ready(command: list[str]) -> float:
    """Wall time from spawning ``command`` to the line that says "worker ready"; then it is stopped."""
    began = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert process.stdout is not None
    try:
        for line in process.stdout:
            if b"worker ready" in line:
                return time.perf_counter() - began
        raise RuntimeError(f"{command[0]} exited without saying it was ready")
    finally:
        process.terminate()
        process.wait(10)


def medians(measure: Callable[[list[str]], float], *commands: list[str]) -> list[float]:
    """The median of RUNS runs of each command, one run of each in turn."""
    found: list[list[float]] = [[] for _ in commands]
    for _ in range(RUNS):
        for times, command in zip(found, commands, strict=True):
            times.append(measure(command))
    return [median(times) for times in found]


def ms(value: float) -> str:
    return f"{value * 1000:.0f} ms"


def main() -> None:
    from devtools.temporal_dev import DevServer, free_port, temporal_binary

    rebuild, worker, temporal = str(BIN / "rebuild"), str(BIN / "rebuild-worker"), temporal_binary()
    ours_help, go_help, interpreter, typer_import, typer_help = medians(
        seconds_of,
        [rebuild, "--help"],
        [temporal, "--help"],
        [PYTHON, "-c", "pass"],
        [PYTHON, "-c", "import typer"],
        [PYTHON, "-c", BARE_TYPER_HELP],
    )
    with tempfile.TemporaryDirectory(prefix="bench-startup-") as tmp:
        workdir = Path(tmp)
        server = DevServer(workdir / "t.db", free_port(), free_port(), workdir / "t.log")
        server.start()
        try:
            address = server.address
            ours_status, go_list, python_status = medians(
                seconds_of,
                [rebuild, "status", "web-1", "--host", "kvm-1", "--address", address],
                [temporal, "workflow", "list", "--address", address],
                [PYTHON, "-c", PYTHON_STATUS, address],
            )
            ours_ready, bare_ready = medians(
                seconds_to_ready,
                [worker, "--host", "bench-startup", "--libvirt-uri", "test:///default",
                 "--state-dir", str(workdir / "state"), "--address", address],
                [PYTHON, "-c", BARE_WORKER, address],
            )  # fmt: skip
        finally:
            server.stop()
    load = os.getloadavg()[0]
    table(
        f"Start-up, median of {RUNS} runs each",
        [
            ("`rebuild --help`", ms(ours_help), f"`temporal --help`: {ms(go_help)}",
             f"{ours_help / go_help:.1f}x the Go CLI; {ms(ours_help)} (<= 150 ms)"),
            ("floors under it: `python -c pass` / `import typer` / a bare Typer app's --help",
             f"{ms(interpreter)} / {ms(typer_import)} / {ms(typer_help)}", "",
             f"`rebuild --help` is {ours_help / typer_help:.2f}x a bare Typer app's"),
            ("`rebuild status X`", ms(ours_status), f"`temporal workflow list`: {ms(go_list)}",
             f"{ours_status / go_list:.1f}x the Go CLI (<= 3)"),
            ("floor: python, `import temporalio.client`, connect, one describe", ms(python_status), "",
             f"`rebuild status` is {ours_status / python_status:.2f}x it; the floor is "
             f"{python_status / go_list:.1f}x the Go CLI"),
            ('`rebuild-worker` to "worker ready"', ms(ours_ready), f"a bare SDK Worker: {ms(bare_ready)}",
             f"{ours_ready / bare_ready:.2f}x the bare worker"),
        ],
    )  # fmt: skip
    print(f"\nload average while measured: {load:.1f} on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
