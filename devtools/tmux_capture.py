"""Retake docs/cli-progress.md: `rebuild start --wait` and `rebuild watch` in tmux, during a real download.

Sets up as ``make demo`` does (the dev server, a fresh worker of this checkout, ``demo-vm`` running
image A on qemu:///system), serves a new 16 MiB image slowly (64 KiB every 50 ms: a download of about
13 s), and runs, in a tmux of its own (``tmux -L rebuild-capture``) 80 columns wide, ``rebuild start
--wait`` in the upper pane and ``rebuild watch`` in the lower one. ``tmux capture-pane -p`` takes the
text of both panes during the download, during the stop and at the end; the page is written from them.

Run: ``make cli-capture`` (or ``.venv/bin/python -m devtools.tmux_capture`` after ``make setup``); it
takes about a minute, and replaces the demo's worker and ``demo-vm`` as ``make demo`` does.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import secrets
import shlex
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter

from devtools import demo
from devtools.guest import write_image
from devtools.image_server import Fault, ImageServer
from starter.errors import UnknownRebuild
from starter.rebuilds import RebuildDescription, describe_rebuild
from workflows.models import Phase

SOCKET = "rebuild-capture"
SESSION = "capture"
WIDTH, HEIGHT = 80, 72
IMAGE_BYTES = 16 << 20
SECONDS_PER_CHUNK = 0.05
STOP_TIMEOUT = "8"
DOCS = Path(__file__).resolve().parent.parent / "docs" / "cli-progress.md"


def tmux(*args: str) -> str:
    done = subprocess.run(["tmux", "-L", SOCKET, *args], capture_output=True, text=True, check=True)
    return done.stdout


def capture(pane: int) -> str:
    """The pane's text as it shows now, runs of blank rows left out."""
    # From the start of its history: a pane that ends scrolls its first line off for tmux's notice.
    text = tmux("capture-pane", "-p", "-S", "-", "-t", f"{SESSION}:0.{pane}")
    lines = [line.rstrip() for line in text.rstrip("\n").splitlines()]
    # The blank rows between the last output and tmux's "Pane is dead" line say nothing.
    return "\n".join(line for i, line in enumerate(lines) if line or (i and lines[i - 1]))


def panes_dead() -> bool:
    return all(flag == "1" for flag in tmux("list-panes", "-t", SESSION, "-F", "#{pane_dead}").split())


def unique_image(directory: Path) -> Path:
    """Image B, with bytes of its own: the host's cache must not already hold it (no download then)."""
    image = write_image(directory / "image-b-progress.raw", "image B", size=IMAGE_BYTES)
    with open(image, "r+b") as disk:
        disk.seek(IMAGE_BYTES // 2)
        disk.write(secrets.token_bytes(4096))
    return image


async def take(address: str, host: str) -> dict[str, str]:
    """Both commands in tmux during a slow download; the panes' text at three moments."""
    images = demo.STATE / "demo" / "images"
    image = unique_image(images)
    digest = hashlib.sha256(image.read_bytes()).hexdigest()
    server = ImageServer(images)
    server.faults[image.name] = Fault(seconds_per_chunk=SECONDS_PER_CHUNK)
    await server.start(demo.IMAGE_PORT)
    rebuild = str(demo.BIN / "rebuild")
    start = [rebuild, "start", demo.VM, "--image", server.url(image.name), "--sha256", digest]
    start += ["--stop-timeout", STOP_TIMEOUT, "--boot-marker", "image B", "--wait"]
    env = ["-e", f"TEMPORAL_ADDRESS={address}", "-e", "TERM=xterm-256color"]
    shots = {"start": shlex.join(["rebuild", *start[1:]]), "watch": f"rebuild watch {demo.VM}"}
    client = await Client.connect(address, data_converter=pydantic_data_converter)
    if await _described(client, host, lambda d: d.workflow_status == "RUNNING", within=0):
        raise SystemExit(f"tmux_capture: a rebuild of {demo.VM} is running already; wait for it or abort it")
    if _tmux_up():
        tmux("kill-server")
    size = ["-x", str(WIDTH), "-y", str(HEIGHT)]
    tmux("-f", "/dev/null", "new-session", "-d", "-s", SESSION, *size, *env, "sleep", "600")
    tmux("set-option", "-t", SESSION, "remain-on-exit", "on")
    tmux("respawn-pane", "-k", "-t", f"{SESSION}:0.0", *env, *start)
    try:
        await _described(client, host, lambda d: d.workflow_status == "RUNNING")
        tmux("split-window", "-v", "-t", f"{SESSION}:0", *env, rebuild, "watch", demo.VM)
        await _described(client, host, lambda d: _share(d) >= 0.5)
        shots["fetch"] = both_panes()
        await _described(client, host, lambda d: d.status is not None and d.status.phase == Phase.STOP)
        await asyncio.sleep(3)
        shots["stop"] = both_panes()
        for _ in range(360):  # both commands end with the rebuild: three minutes at most
            if panes_dead():
                break
            await asyncio.sleep(0.5)
        shots["end"] = both_panes()
    finally:
        tmux("kill-server")
        await server.stop()
    return shots


def both_panes() -> str:
    return f"{capture(0)}\n\n{'-' * 30} lower pane {'-' * 30}\n\n{capture(1)}"


def _tmux_up() -> bool:
    return subprocess.run(["tmux", "-L", SOCKET, "list-sessions"], capture_output=True).returncode == 0


def _share(described: RebuildDescription) -> float:
    download = described.download
    if download is None or not download.total_bytes:
        return 0.0
    return download.done_bytes / download.total_bytes


async def _described(
    client: Client, host: str, condition: Callable[[RebuildDescription], bool], within: float = 120
) -> bool:
    """Wait until the demo's latest rebuild meets ``condition`` (or has ended): whether it met it."""
    deadline = time.monotonic() + within
    while True:
        try:
            described = await describe_rebuild(client, demo.VM, host)
        except UnknownRebuild:
            described = None
        if described is not None and condition(described):
            return True
        if time.monotonic() >= deadline:
            if within:
                raise SystemExit(f"tmux_capture: the rebuild did not get there within {within:g} s")
            return False
        await asyncio.sleep(0.2)


PAGE = """# Following a rebuild: `rebuild start --wait` and `rebuild watch`, as a terminal shows them

What an operator sees while a rebuild runs (see [cli.md](cli.md)): `rebuild start --wait` prints every
phase once, as it is entered, with the time since the rebuild began; during the download its bytes,
size, speed and ETA; during the stop what is left of the graceful window before the instance is forced
off. `rebuild watch` shows the same from another terminal, and the step timings at the end. On a
terminal the download and the stop are one live line; in a pipe or a log they are plain lines every
few seconds (`--json` prints only the result).

Taken {taken} by `make cli-capture` (`devtools/tmux_capture.py`): the demo's set-up (`make demo`: the
dev server, a worker, `demo-vm`, a boot-sector guest on qemu:///system that ignores ACPI, so its stop
waits out the window), a fresh 16 MiB image served at 64 KiB every 50 ms, and tmux {width} columns
wide. The upper pane runs

    {start}

and the lower one, once the rebuild runs, `{watch}`. `tmux capture-pane -p` took the text of both.

## During the download

```text
{fetch}
```

## During the stop (the guest ignores the ACPI power button)

```text
{stop}
```

## At the end

```text
{end}
```
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DOCS, help="where the page goes")
    args = parser.parse_args()
    if shutil.which("tmux") is None:
        sys.exit("tmux_capture: tmux is not installed (apt-get install tmux)")
    demo.secure_state_dir(demo.STATE)
    (demo.STATE / "demo" / "images").mkdir(parents=True, exist_ok=True)
    demo.ensure_temporal()
    demo.restart_worker()
    demo.define_demo_vm(demo.STATE / "demo" / f"{demo.VM}.img", demo.STATE / "demo" / f"{demo.VM}.serial.log")
    address = f"127.0.0.1:{demo.TEMPORAL_PORT}"
    shots = asyncio.run(take(address, socket.gethostname()))
    taken = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    args.out.write_text(PAGE.format(taken=taken, width=WIDTH, **shots))
    print(f"wrote {args.out}")
    os._exit(0)


if __name__ == "__main__":
    main()
