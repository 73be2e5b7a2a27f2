"""docs/examples/rebuild_from_service.py, the Python API's example, runs as written: against the dev
server and a fake host it starts a rebuild that waits for approval, approves it and reports the end."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

from devtools.temporal_dev import DevServer
from devtools.testbed.fake_host import FakeHost

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = "docs.examples.rebuild_from_service"


async def run_example(*args: str) -> tuple[int, str, str]:
    env = {
        k: v for k, v in os.environ.items() if k not in ("REBUILD_CODEC_KEY_FILE", "CREDENTIALS_DIRECTORY")
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        EXAMPLE,
        *args,
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_the_example_rebuilds_with_approval(
    dev_server: DevServer, unique_host: str, fake_host: FakeHost
) -> None:
    code, out, err = await run_example(
        "vm-ex",
        "--host",
        unique_host,
        "--image",
        "http://images.invalid/new.qcow2",
        "--approve",
        "--address",
        dev_server.address,
    )
    assert code == 0, (out, err)
    assert "phase: await-approval" in out
    assert out.splitlines()[-2].startswith("rebuilt: http://images.invalid/new.qcow2")
    assert "stop_instance" in fake_host.calls


async def test_the_example_says_a_host_without_a_worker_is_refused(
    dev_server: DevServer, unique_host: str
) -> None:
    code, out, err = await run_example(
        "vm-ex",
        "--host",
        unique_host,
        "--image",
        "http://images.invalid/new.qcow2",
        "--address",
        dev_server.address,
    )
    assert code == 2, (out, err)
    assert err.startswith("refused: ") and unique_host in err
