"""``make demo``: a real rebuild of a real, tiny VM, from image A to image B, through Temporal.

Starts (or reuses) the Temporal dev server with the Web UI and a worker, both detached so they outlive
this script; defines ``demo-vm`` booting image A; serves image B over HTTP; runs ``rebuild start
demo-vm --wait``; shows the serial console before and after.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import quote

import libvirt

from activities.state import DEFAULT_STATE_DIR
from devtools.guest import domain_xml, remove_domain, write_image
from devtools.image_server import ImageServer
from devtools.temporal_dev import DevServer, pid_alive, port_open
from workflows.models import rebuild_workflow_id

# Host-wide, like a real worker's: a second checkout's demo reuses the same dev server and replaces
# the same worker instead of starting a rival one on the same host queue.
STATE = Path(os.environ.get("REBUILD_STATE_DIR", str(DEFAULT_STATE_DIR)))
VM = "demo-vm"
TEMPORAL_PORT, UI_PORT, IMAGE_PORT = 7233, 8233, 8088
LIBVIRT_URI = "qemu:///system"
BIN = Path(sys.executable).parent
libvirt.registerErrorHandler(lambda _ctx, _err: None, None)


def say(message: str) -> None:
    print(f"==> {message}", flush=True)


def secure_state_dir(state: Path) -> None:
    """The state directory 0711: QEMU's user must traverse it to the cached images (DESIGN: "On a
    host"), but nobody lists it or reads what is not made readable on purpose."""
    state.mkdir(parents=True, exist_ok=True)
    state.chmod(0o711)
    for name in ("temporal.db", "temporal.db-wal", "temporal.db-shm", "temporal.log"):
        if (state / name).exists():
            (state / name).chmod(0o600)


def ensure_temporal() -> None:
    if port_open(TEMPORAL_PORT):
        say(f"Temporal dev server already listening on localhost:{TEMPORAL_PORT}")
        return
    server = DevServer(
        db_file=STATE / "temporal.db",
        port=TEMPORAL_PORT,
        ui_port=UI_PORT,
        log_file=STATE / "temporal.log",
    )
    # The dev server's database holds every history (user data included, without a codec key): 0600.
    previous = os.umask(0o077)
    try:
        server.start(detach=True)
    finally:
        os.umask(previous)
    secure_state_dir(STATE)
    assert server.process is not None
    (STATE / "temporal.pid").write_text(str(server.process.pid))
    say(f"started the Temporal dev server (pid {server.process.pid}, state in {server.db_file})")


def restart_worker() -> None:
    """A fresh worker each run, so it always runs the code of this checkout."""
    pid_file = STATE / "worker.pid"
    if pid_file.exists():
        old = int(pid_file.read_text())
        if pid_alive(old):
            os.kill(old, signal.SIGTERM)
            for _ in range(50):
                if not pid_alive(old):
                    break
                time.sleep(0.1)
    log = open(STATE / "worker.log", "ab")  # noqa: SIM115 - handed to the detached worker
    worker = subprocess.Popen(
        [
            str(BIN / "rebuild-worker"),
            "--libvirt-uri",
            LIBVIRT_URI,
            # The worker's default state directory, so `rebuild cache list` reads its cache as is.
            "--state-dir",
            str(STATE),
            "--address",
            f"127.0.0.1:{TEMPORAL_PORT}",
            # The demo's image server is on loopback, which workers refuse unless told otherwise.
            "--allow-image-network",
            "127.0.0.0/8",
        ],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    pid_file.write_text(str(worker.pid))
    deadline = time.monotonic() + 30
    while b"worker ready" not in (STATE / "worker.log").read_bytes()[-4096:]:
        if worker.poll() is not None or time.monotonic() > deadline:
            sys.exit(f"demo: the worker did not start; see {STATE / 'worker.log'}")
        time.sleep(0.1)
    say(f"started a worker for host {socket.gethostname()} (pid {worker.pid})")


def define_demo_vm(disk: Path, serial: Path) -> None:
    """A fresh demo-vm on image A, running: the starting point of every demo run."""
    conn = libvirt.open(LIBVIRT_URI)
    remove_domain(conn, VM)
    for leftover in disk.parent.glob(f"{disk.name}.rebuild-*"):
        leftover.unlink()
    write_image(disk, "image A")
    serial.write_bytes(b"")
    domain = conn.defineXML(domain_xml(VM, disk, serial))
    domain.create()
    conn.close()
    wait_for(serial, b"image A", 0)
    say(
        f"defined and started {VM}: a tiny boot-sector guest (no OS; it prints its image's name and "
        "halts), for speed; the real Debian guest is in tests/real_guest/ and bench/real_guest.py"
    )
    say("its serial console says:")
    print("    " + serial.read_text().strip().replace("\n", "\n    "), flush=True)


def wait_for(serial: Path, marker: bytes, offset: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while marker not in serial.read_bytes()[offset:]:
        if time.monotonic() > deadline:
            sys.exit(f"demo: {VM} did not print {marker.decode()!r} within {timeout:g} s")
        time.sleep(0.1)


async def rebuild(images: Path) -> int:
    image_b = write_image(images / "image-b.qcow2", "image B", fmt="qcow2")
    digest = hashlib.sha256(image_b.read_bytes()).hexdigest()
    server = ImageServer(images)
    await server.start(IMAGE_PORT)
    say(f"serving image B at {server.url(image_b.name)} (sha256 {digest[:16]}...)")
    command = [
        str(BIN / "rebuild"),
        "start",
        VM,
        "--image",
        server.url(image_b.name),
        "--sha256",
        digest,
        "--stop-timeout",
        "2",
        "--boot-marker",
        "image B",
        "--requested-by",
        "make demo",
        "--wait",
    ]
    say("$ " + " ".join(command[0:1]).rsplit("/", 1)[-1] + " " + " ".join(command[1:]))
    env = dict(os.environ, TEMPORAL_ADDRESS=f"127.0.0.1:{TEMPORAL_PORT}")
    process = await asyncio.create_subprocess_exec(*command, env=env)
    code = await process.wait()
    await server.stop()
    return code


def main() -> None:
    secure_state_dir(STATE)
    demo = STATE / "demo"
    images = demo / "images"
    images.mkdir(parents=True, exist_ok=True)
    ensure_temporal()
    restart_worker()
    disk, serial = demo / f"{VM}.img", demo / f"{VM}.serial.log"
    define_demo_vm(disk, serial)
    code = asyncio.run(rebuild(images))
    say(f"{VM}'s serial console now says (one line per boot):")
    print("    " + serial.read_text().strip().replace("\n", "\n    "), flush=True)
    say(
        f"Web UI: http://localhost:{UI_PORT}/namespaces/default/workflows/"
        f"{quote(rebuild_workflow_id(socket.gethostname(), VM), safe=':')}"
    )
    sys.stdout.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
