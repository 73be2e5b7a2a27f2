"""Prometheus's ``promtool``, taken out of Debian's ``prometheus`` package without installing it.

Installing the package would start a Prometheus server on the operator's host; the tests need only
the checker. ``apt-get download`` fetches the package, ``dpkg-deb -x`` unpacks it into a cache, and
nothing outside the cache changes.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

CACHE = Path(os.environ.get("REBUILD_PROMTOOL_CACHE", "/var/cache/durable-rebuild/promtool"))


class PromtoolUnavailable(RuntimeError):
    """Debian's prometheus package could not be fetched or unpacked here."""


def promtool() -> Path:
    """The path of a ``promtool`` binary, fetched once per machine."""
    found = shutil.which("promtool")
    if found:
        return Path(found)
    cached = CACHE / "usr" / "bin" / "promtool"
    if cached.exists():
        return cached
    with tempfile.TemporaryDirectory() as work:
        fetched = _download(work)
        if fetched.returncode != 0:
            # A fresh machine may have no package lists yet.
            subprocess.run(["apt-get", "update", "-qq"], capture_output=True, check=False)
            fetched = _download(work)
        debs = sorted(Path(work).glob("prometheus_*.deb"))
        if fetched.returncode != 0 or not debs:
            raise PromtoolUnavailable(f"apt-get download prometheus failed: {fetched.stderr.strip()}")
        unpacked = Path(work) / "root"
        subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(unpacked)], check=True)
        CACHE.mkdir(parents=True, exist_ok=True)
        staged = CACHE / "usr" / "bin"
        staged.mkdir(parents=True, exist_ok=True)
        shutil.copy2(unpacked / "usr" / "bin" / "promtool", staged / "promtool.partial")
        os.replace(staged / "promtool.partial", cached)
    return cached


def _download(directory: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["apt-get", "download", "prometheus"], cwd=directory, capture_output=True, text=True, check=False
    )
