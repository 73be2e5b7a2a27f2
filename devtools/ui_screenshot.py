"""Look at a finished rebuild in the Temporal Web UI as a person would: headless Chromium, a screenshot.

Run `make demo` first; then `make ui-screenshot` writes docs/web-ui-rebuild.png of the demo's
rebuild page (Debian's chromium package, no browser download). The default workflow ID is the
demo's own (`rebuild:<host>:demo-vm`). A page that says the workflow is not there (the UI's 404) is
not saved: the script says so and exits 1.
"""

from __future__ import annotations

import argparse
import html
import json
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import quote

from devtools.temporal_dev import port_open
from workflows.names import rebuild_workflow_id

# The demo's instance and the dev server's UI port (devtools/demo.py: VM, UI_PORT).
DEMO_VM = "demo-vm"
UI_PORT = 8233

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

# In the title "404" or "not found"; in the page only the words (a timestamp may end in .404).
NOT_FOUND_TITLE = re.compile(r"\b404\b|not found", re.IGNORECASE)
NOT_FOUND_TEXT = re.compile(r"not found", re.IGNORECASE)


def workflow_missing(ui_port: int, namespace: str, workflow_id: str) -> bool:
    """Whether the UI server's API says there is no such workflow (HTTP 404); unknown answers: no."""
    url = (
        f"http://localhost:{ui_port}/api/v1/namespaces/{quote(namespace, safe='')}"
        f"/workflows/{quote(workflow_id, safe='')}"
    )
    try:
        with urllib.request.urlopen(url, timeout=10) as reply:
            json.load(reply)
    except urllib.error.HTTPError as error:
        return error.code == 404
    except (OSError, ValueError):
        return False
    return False


def visible_text(dom: str) -> str:
    """The page's text as shown: no scripts, styles or tags, whitespace collapsed."""
    dom = re.sub(r"<(script|style)\b.*?</\1>", " ", dom, flags=re.IGNORECASE | re.DOTALL)
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", dom)).split())


def looks_not_found(dom: str) -> bool:
    """The UI's not-found page: its title, or the start of what it shows, says 404 / not found."""
    title = re.search(r"<title[^>]*>(.*?)</title>", dom, flags=re.IGNORECASE | re.DOTALL)
    if title and NOT_FOUND_TITLE.search(title.group(1)):
        return True
    return bool(NOT_FOUND_TEXT.search(visible_text(dom)[:2000]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ui-port", type=int, default=UI_PORT)
    parser.add_argument("--namespace", default="default")
    parser.add_argument("--workflow-id", default=rebuild_workflow_id(socket.gethostname(), DEMO_VM))
    parser.add_argument("--out", type=Path, default=Path("docs/web-ui-rebuild.png"))
    args = parser.parse_args()
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        sys.exit("ui-screenshot: chromium is missing (apt-get install chromium)")
    if not port_open(args.ui_port):
        sys.exit(f"ui-screenshot: no Web UI on localhost:{args.ui_port}; run `make demo` first")
    if workflow_missing(args.ui_port, args.namespace, args.workflow_id):
        sys.exit(
            f"ui-screenshot: no workflow {args.workflow_id} in namespace {args.namespace}; "
            "run `make demo` first, or name one with --workflow-id"
        )
    url = (
        f"http://localhost:{args.ui_port}/namespaces/{quote(args.namespace, safe='')}/workflows/"
        f"{quote(args.workflow_id, safe=':')}"
    )
    with tempfile.TemporaryDirectory(prefix="chromium-") as scratch:
        shot = Path(scratch) / "shot.png"
        profile = Path(scratch) / "profile"
        dom = subprocess.run(
            [browser, *FLAGS, f"--user-data-dir={profile}", "--dump-dom", url],
            check=True,
            capture_output=True,
            text=True,
            timeout=120,
        ).stdout
        if looks_not_found(dom):
            sys.exit(f"ui-screenshot: {url} is the UI's not-found page; nothing saved")
        subprocess.run(
            [browser, *FLAGS, f"--user-data-dir={profile}", f"--screenshot={shot}", url],
            check=True,
            capture_output=True,
            timeout=120,
        )
        args.out.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(shot, args.out)
    print(f"{url} -> {args.out}")


if __name__ == "__main__":
    main()
