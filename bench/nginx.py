"""A real web server for the download bench: nginx from Debian's packages, serving files with
``sendfile`` from the page cache, started by the bench and stopped by it, whatever happens.

The package is installed when missing; if installing it started the distribution's own nginx (a
host where services start on install), that one is stopped again, so the host is left as found.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from devtools.temporal_dev import port_open, stop_process

CONFIG = """\
daemon off;
master_process on;
worker_processes 1;
user root;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 64; }}
http {{
    sendfile on;
    tcp_nopush on;
    access_log off;
    default_type application/octet-stream;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    server {{
        listen 127.0.0.1:{port};
        root {root};
    }}
}}
"""


UPDATE = ["apt-get", "update", "-qq"]
INSTALL = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "nginx-light"]


class NginxUnavailable(RuntimeError):
    pass


def ensure_nginx() -> str:
    found = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if found:
        return found
    was_running = Path("/run/nginx.pid").exists()
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (UPDATE, INSTALL):
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode:
            raise NginxUnavailable(f"{' '.join(command)} failed: {done.stderr.strip()[-500:]}")
    if not was_running and Path("/run/nginx.pid").exists():
        # The package's own service came up on port 80: not ours to leave running.
        subprocess.run(["/usr/sbin/nginx", "-s", "quit"], capture_output=True)
    return "/usr/sbin/nginx"


@contextmanager
def nginx_serving(root: Path, port: int, prefix: Path) -> Iterator[str]:
    """nginx serving ``root`` at http://127.0.0.1:PORT/ until the block ends."""
    binary = ensure_nginx()
    prefix.mkdir(parents=True, exist_ok=True)
    config = prefix / "nginx.conf"
    config.write_text(CONFIG.format(prefix=prefix, port=port, root=root))
    process = subprocess.Popen(
        [binary, "-p", str(prefix), "-c", str(config)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while not port_open(port):
            if process.poll() is not None or time.monotonic() > deadline:
                raise NginxUnavailable(f"nginx did not start: {(prefix / 'error.log').read_text()[-500:]}")
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_process(process)
