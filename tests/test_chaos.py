"""The chaos script with a small N: random SIGKILLs of the worker, nothing lost."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_chaos_loses_nothing(libvirt_conn: object) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench.chaos", "--rebuilds", "3", "--kill-probability", "1", "--seed", "7"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    table = done.stdout.strip().splitlines()[-1]
    rebuilds, kills, finished, rolled_back, lost, _ = (int(c) for c in table.strip("|").split("|"))
    assert (rebuilds, kills, lost) == (3, 3, 0)
    assert finished + rolled_back == 3
