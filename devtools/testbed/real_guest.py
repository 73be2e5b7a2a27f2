"""Reading a real guest from outside: its console log, and its guest agent (``guest-exec``)."""

from __future__ import annotations

import base64
import json
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import libvirt
import libvirt_qemu
import pytest

from devtools.guest import SECTOR
from devtools.real_guest_domain import overlay, real_domain_xml
from devtools.temporal_dev import DevServer
from devtools.testbed.e2e import DOMAIN_PREFIX, CliResult, Guest, WorkerProcess, rebuild_cli

# TCG boots it to multi-user in about 15 s on an idle 2-core host; a loaded one took 230 s.
BOOT_SECONDS = 600.0
MULTI_USER = r"real image [A-Z] reached multi-user"


# Real-guest tests run in two pytest-xdist workers, each on the one guest it booted: the identity
# story (four cloud-init first boots, by far the longest) alone, every other one after another on the
# second. A TCG guest keeps a core busy: four at once on a 2-core machine starved each other (a boot
# to multi-user took 360 s instead of 15-40 s, a rollback test timed out, the suite took 25-36 min),
# and one at a time made the suite as long as their sum (38 min).
SHARED_GUEST = pytest.mark.xdist_group("real-guest")
IDENTITY_GUEST = pytest.mark.xdist_group("real-guest-identity")


@dataclass(frozen=True)
class Exec:
    """What a command run inside the guest returned."""

    code: int
    out: str
    err: str


def define(conn: Any, directory: Path, base: Path, domain_type: str, *, agent: bool) -> Guest:
    """A real guest with what real instances have: two NICs, a data disk, a pty console, an agent."""
    name = f"{DOMAIN_PREFIX}real-{uuid.uuid4().hex[:8]}"
    disk = overlay(base, directory / f"{name}.qcow2")
    data = directory / f"{name}-data.img"
    data.write_bytes(b"precious data" * 1000)
    log = directory / f"{name}.console.log"
    macs = ("52:54:00:bb:00:01", "52:54:00:bb:00:02")
    conn.defineXML(
        real_domain_xml(name, disk, log, data_disks=(data,), macs=macs, domain_type=domain_type, agent=agent)
    )
    return Guest(conn, name, disk, log, data, macs)


def halting_boot_sector() -> bytes:
    """A disk that boots nothing: a valid boot sector (0x55AA) that halts without a word."""
    code = bytes.fromhex("faf4ebfd")  # cli; hlt; jmp hlt
    return code.ljust(SECTOR - 2, b"\0") + b"\x55\xaa"


def read(path: Path) -> str:
    return path.read_bytes().decode(errors="replace") if path.exists() else ""


def agent(guest: Guest, command: dict[str, Any], timeout: int = 5) -> Any:
    answer = libvirt_qemu.qemuAgentCommand(guest.domain, json.dumps(command), timeout, 0)
    return json.loads(answer)["return"]


def wait_for_agent(guest: Guest, timeout: float = BOOT_SECONDS) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            agent(guest, {"execute": "guest-ping"}, 2)
            return
        except libvirt.libvirtError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def guest_exec(guest: Guest, *argv: str, timeout: float = 30) -> Exec:
    """Run ``argv`` inside the guest through its agent (no network, no ssh): its exit code and output."""
    pid = agent(
        guest,
        {
            "execute": "guest-exec",
            "arguments": {"path": argv[0], "arg": list(argv[1:]), "capture-output": True},
        },
    )["pid"]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = agent(guest, {"execute": "guest-exec-status", "arguments": {"pid": pid}})
        if status["exited"]:
            return Exec(
                code=int(status.get("exitcode", -1)),
                out=base64.b64decode(status.get("out-data", "")).decode(errors="replace"),
                err=base64.b64decode(status.get("err-data", "")).decode(errors="replace"),
            )
        time.sleep(0.2)
    raise AssertionError(f"{' '.join(argv)} did not finish inside {guest.name} within {timeout:g} s")


def read_in_guest(guest: Guest, path: str) -> str | None:
    """A file's text as the guest sees it; None where it does not exist."""
    result = guest_exec(guest, "/bin/cat", path)
    return result.out if result.code == 0 else None


def image_in_guest(guest: Guest) -> str:
    """Which image the running guest booted ("A", "B"), read inside it."""
    name = read_in_guest(guest, "/etc/rebuild-image")
    assert name is not None, f"{guest.name} has no /etc/rebuild-image"
    return name.strip()


async def rebuild(
    worker: WorkerProcess, dev_server: DevServer, guest: Guest, url: str, *extra: str
) -> CliResult:
    """``rebuild start --wait --json`` of ``guest`` to the image at ``url``, as an operator runs it."""
    return await rebuild_cli(
        dev_server.address,
        "start", guest.name, "--image", url, "--host", worker.host, "--stop-timeout", "120",
        "--wait", "--json", *extra,
        timeout=1200,
    )  # fmt: skip


async def rebuild_verified_by_agent(
    worker: WorkerProcess, dev_server: DevServer, guest: Guest, url: str, sha: str
) -> dict[str, Any]:
    """A rebuild of ``guest`` to the image at ``url``, verified by its agent; its JSON result, checked:
    rebuilt, and the guest stopped by itself (ACPI or its agent, not forced)."""
    result = await rebuild(
        worker,
        dev_server,
        guest,
        url,
        "--sha256",
        sha,
        "--verify",
        "agent",
        "--boot-timeout",
        str(BOOT_SECONDS),
    )
    assert result.code == 0, result.stderr
    outcome = result.json()
    assert outcome["outcome"] == "rebuilt"
    assert outcome["stopped_by"] in ("acpi", "agent")
    assert outcome["forced_stop"] is False
    assert outcome["verified_by"] == "agent"
    return outcome
