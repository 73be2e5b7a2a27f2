"""Shared bits of the benchmarks: quick vs full mode, timing, and a figures table."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

QUICK = os.environ.get("BENCH_QUICK") == "1" or "--quick" in sys.argv
BIN = Path(sys.executable).parent
MiB = 1 << 20
GiB = 1 << 30


@contextmanager
def timed() -> Iterator[list[float]]:
    """``with timed() as t: ...`` then ``t[0]`` holds the seconds."""
    result: list[float] = []
    began = time.perf_counter()
    try:
        yield result
    finally:
        result.append(time.perf_counter() - began)


def table(title: str, rows: list[tuple[str, str, str, str]]) -> None:
    """figure | value | reference | ratio / goal, as a markdown table for docs/benchmarks.md."""
    print(f"\n{title}{' (quick mode)' if QUICK else ''}\n")
    print("| figure | value | reference | ratio (goal) |")
    print("| --- | --- | --- | --- |")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    sys.stdout.flush()


def random_file(path: Path, size: int) -> Path:
    """Incompressible bytes, written fast: 64 MiB of urandom repeated."""
    block = os.urandom(min(size, 64 * MiB))
    with open(path, "wb") as out:
        written = 0
        while written < size:
            piece = block[: size - written]
            out.write(piece)
            written += len(piece)
    return path


def start_image_server(directory: Path, port: int) -> subprocess.Popen[bytes]:
    """The image server in its own process, so it never competes with the code measured."""
    server = subprocess.Popen(
        [sys.executable, "-m", "devtools.image_server", str(directory), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    assert server.stdout is not None
    server.stdout.readline()  # "serving ..."
    return server
