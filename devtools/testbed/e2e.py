"""Real guests on a real libvirtd, a real worker process, and the CLI as an operator runs it."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import libvirt

from activities.domain_xml import SEED_ALIAS
from activities.network import AddressPolicy, parse_networks
from devtools.guest import domain_xml, remove_domain, write_image
from devtools.image_server import ImageServer
from devtools.temporal_dev import stop_process

LIBVIRT_URI = "qemu:///system"
# Every domain a test run defines carries this run's prefix, so the run removes exactly its own at the
# end, also after a failure, and never another run's.
DOMAIN_PREFIX = f"e2e-{uuid.uuid4().hex[:6]}-"
# The tests' image servers listen on loopback, which a worker refuses unless its operator allows it.
LOOPBACK_NETWORKS = ("127.0.0.0/8",)
LOOPBACK_POLICY = AddressPolicy(parse_networks(LOOPBACK_NETWORKS))
BIN = Path(sys.executable).parent
# TCG boots a boot-sector guest in a third of a second; nested KVM's BIOS takes seconds.
DOMAIN_TYPE = os.environ.get("REBUILD_E2E_DOMAIN_TYPE", "qemu")


@dataclass
class Guest:
    conn: Any
    name: str
    disk: Path
    serial: Path
    data_disk: Path
    macs: tuple[str, ...]

    @property
    def domain(self) -> Any:
        return self.conn.lookupByName(self.name)

    def console(self) -> str:
        return self.serial.read_bytes().decode(errors="replace")

    def wait_for_console(self, marker: str, after: int = 0, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while marker not in self.console()[after:]:
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{self.name} did not print {marker!r}; console: {self.console()[-2000:]!r}"
                )
            time.sleep(0.05)

    def identity(self) -> dict[str, Any]:
        """What a rebuild must keep: UUID, MACs, vCPUs, memory, other disks.

        The identity seed CD-ROM is not one of them: each rebuild that gives an identity writes a new
        seed (a new file), and it is the rebuild's own device (``SEED_ALIAS``)."""
        xml = ET.fromstring(self.domain.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
        return {
            "uuid": xml.findtext("uuid"),
            "macs": [m.get("address") for m in xml.findall("./devices/interface/mac")],
            "vcpus": xml.findtext("vcpu"),
            "memory": xml.findtext("memory"),
            "data_disks": [
                s.get("file")
                for d in xml.findall("./devices/disk")
                if _kept_disk(d)
                for s in d.findall("source")
            ],
        }

    def root_format(self) -> str:
        xml = ET.fromstring(self.domain.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
        for disk in xml.findall("./devices/disk"):
            target = disk.find("target")
            driver = disk.find("driver")
            if target is not None and target.get("dev") == "vda" and driver is not None:
                return str(driver.get("type"))
        raise AssertionError("no root disk")

    def leftovers(self) -> list[Path]:
        return sorted(self.disk.parent.glob(f"{self.disk.name}.rebuild-*"))

    def remove(self) -> None:
        remove_domain(self.conn, self.name)


def _kept_disk(disk: ET.Element) -> bool:
    """A disk other than the root (vda) and the rebuild's seed CD-ROM."""
    target, alias = disk.find("target"), disk.find("alias")
    if target is None or target.get("dev") == "vda":
        return False
    return alias is None or alias.get("name") != SEED_ALIAS


def make_guest(conn: Any, directory: Path, marker: str = "image A", root_format: str = "raw") -> Guest:
    name = f"{DOMAIN_PREFIX}{uuid.uuid4().hex[:8]}"
    disk = write_image(directory / f"{name}.img", marker, fmt=root_format, size=4 << 20)
    data = directory / f"{name}-data.img"
    data.write_bytes(b"precious data" * 1000)
    serial = directory / f"{name}.serial.log"
    macs = ("52:54:00:aa:00:01", "52:54:00:aa:00:02")
    conn.defineXML(
        domain_xml(
            name,
            disk,
            serial,
            root_format=root_format,
            data_disks=(data,),
            macs=macs,
            domain_type=DOMAIN_TYPE,
            vcpus=2,
            memory_mib=48,
        )
    )
    guest = Guest(conn, name, disk, serial, data, macs)
    try:
        guest.domain.create()
        guest.wait_for_console(marker)
    except BaseException:
        guest.remove()
        raise
    return guest


def remove_domains(conn: Any, prefix: str = DOMAIN_PREFIX) -> list[str]:
    """Destroy and undefine every domain whose name starts with ``prefix``; their names."""
    removed = []
    for domain in conn.listAllDomains():
        if domain.name().startswith(prefix):
            remove_domain(conn, domain.name())
            removed.append(domain.name())
    return removed


@dataclass
class WorkerProcess:
    host: str
    state_dir: Path
    address: str
    log: Path
    pause_dir: Path | None = None
    extra_args: tuple[str, ...] = ()
    process: subprocess.Popen[bytes] | None = field(default=None, init=False)

    def start(self, timeout: float = 30) -> None:
        command = [
            str(BIN / "rebuild-worker"),
            "--host",
            self.host,
            "--libvirt-uri",
            LIBVIRT_URI,
            "--state-dir",
            str(self.state_dir),
            "--address",
            self.address,
        ]
        for network in LOOPBACK_NETWORKS:
            command += ["--allow-image-network", network]
        if self.pause_dir is not None:
            command += ["--pause-dir", str(self.pause_dir)]
        command += self.extra_args
        offset = self.log.stat().st_size if self.log.exists() else 0
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        deadline = time.monotonic() + timeout
        while b"worker ready" not in self.log.read_bytes()[offset:]:
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"worker did not start: {self.log.read_text()[-2000:]}")
            time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL: no cleanup, no goodbye, as a crashed host would."""
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()

    def stop(self) -> None:
        stop_process(self.process)


@dataclass
class CliResult:
    code: int
    stdout: str
    stderr: str

    def json(self) -> dict[str, Any]:
        parsed: dict[str, Any] = json.loads(self.stdout)
        return parsed


async def rebuild_cli(
    address: str, *args: str, timeout: float = 120, env: dict[str, str] | None = None
) -> CliResult:
    """``rebuild ARGS`` as an operator runs it, without blocking the test's event loop."""
    process = await asyncio.create_subprocess_exec(
        str(BIN / "rebuild"),
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=dict(os.environ, TEMPORAL_ADDRESS=address, **(env or {})),
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout)
    assert process.returncode is not None
    return CliResult(process.returncode, out.decode(), err.decode())


async def wait_for_file(path: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} did not appear within {timeout:g} s")
        await asyncio.sleep(0.05)


def serve(server: ImageServer, marker: str, fmt: str, size: int = 4 << 20) -> tuple[str, str]:
    path = write_image(server.directory / f"{marker.replace(' ', '-')}.{fmt}", marker, fmt=fmt, size=size)
    return server.url(path.name), hashlib.sha256(path.read_bytes()).hexdigest()
