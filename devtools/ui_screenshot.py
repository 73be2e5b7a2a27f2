"""Look at a finished rebuild in the Temporal Web UI as a person would: headless Chromium, a screenshot.

Run `make demo` first; then `make ui-screenshot` writes docs/web-ui-rebuild.png of the demo's
rebuild page (Debian's chromium package, no browser download).
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from devtools.temporal_dev import port_open

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--window-size=1440,1100",
    "--virtual-time-budget=20000",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ui-port", type=int, default=8233)
    parser.add_argument("--workflow-id", default=f"rebuild-{socket.gethostname()}-demo-vm")
    parser.add_argument("--out", type=Path, default=Path("docs/web-ui-rebuild.png"))
    args = parser.parse_args()
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        sys.exit("ui-screenshot: chromium is missing (apt-get install chromium)")
    if not port_open(args.ui_port):
        sys.exit(f"ui-screenshot: no Web UI on localhost:{args.ui_port}; run `make demo` first")
    url = f"http://localhost:{args.ui_port}/namespaces/default/workflows/{args.workflow_id}"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        subprocess.run(
            [browser, *FLAGS, f"--user-data-dir={profile}", f"--screenshot={args.out.resolve()}", url],
            check=True,
            capture_output=True,
            timeout=120,
        )
    print(f"{url} -> {args.out}")


if __name__ == "__main__":
    main()
