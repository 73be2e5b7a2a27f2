"""Domains shaped by hand, on a real libvirtd with boot-sector guests: the bed the real-domain and the
root-disk back-end tests share (a guest of any devices, the CLI against a worker, and the assertions a
refusal before the stop must pass)."""

from __future__ import annotations

import hashlib
import os
import time
import uuid
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from xml.sax.saxutils import quoteattr

import libvirt
from temporalio.client import Client

from devtools.guest import shaped_domain_xml
from devtools.image_server import ImageServer
from devtools.temporal_dev import DevServer
from devtools.testbed.e2e import (
    DOMAIN_PREFIX,
    DOMAIN_TYPE,
    CliResult,
    WorkerProcess,
    rebuild_cli,
    serve,
    wait_for_file,
)
from workflows.models import rebuild_workflow_id

INACTIVE = libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE


def disk_xml(path: Path, target: str, fmt: str = "raw", extra: str = "", source_extra: str = "") -> str:
    return (
        f"<disk type='file' device='disk'><driver name='qemu' type='{fmt}'/>"
        f"<source file={quoteattr(str(path))}>{source_extra}</source>"
        f"<target dev='{target}' bus='virtio'/>{extra}</disk>"
    )


@dataclass
class Shaped:
    """A guest defined from hand-written devices; ``files`` are every disk file it has."""

    name: str
    root: Path
    serial: Path
    conn: Any
    files: list[Path] = field(default_factory=list)

    @property
    def domain(self) -> Any:
        return self.conn.lookupByName(self.name)

    def console(self) -> str:
        return self.serial.read_bytes().decode(errors="replace") if self.serial.exists() else ""

    def wait_for_console(self, marker: str, after: int = 0, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while marker not in self.console()[after:]:
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name} did not print {marker!r}: {self.console()[-500:]!r}")
            time.sleep(0.05)

    def definition(self) -> str:
        return str(self.domain.XMLDesc(INACTIVE))

    def checksums(self, but: Path | None = None) -> dict[str, str]:
        return {
            str(path): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in self.files
            if path != but and path.exists()
        }


OTHER_TOOLS_METADATA = """
  <metadata>
    <libosinfo:libosinfo xmlns:libosinfo="http://libosinfo.org/xmlns/libvirt/domain/1.0">
      <libosinfo:os id="http://debian.org/debian/12"/>
    </libosinfo:libosinfo>
  </metadata>"""


class Bed:
    """What every test here needs: libvirtd, a directory QEMU reaches, a worker, an image server."""

    def __init__(
        self, conn: Any, directory: Path, worker: WorkerProcess, images: ImageServer, server: DevServer
    ) -> None:
        self.conn, self.directory, self.worker, self.images, self.server = (
            conn, directory, worker, images, server
        )  # fmt: skip
        self.made: list[Shaped] = []

    @property
    def cache(self) -> Path:
        return self.worker.state_dir / "images"

    def serve(self, marker: str, fmt: str) -> tuple[str, str]:
        return serve(self.images, marker, fmt)

    def define(
        self,
        root: Path,
        devices: str,
        *,
        files: tuple[Path, ...] = (),
        os_extra: str = "",
        transient: bool = False,
    ) -> Shaped:
        """A guest with these devices, started, once it printed "image A" (its boot sector's)."""
        name = f"{DOMAIN_PREFIX}{uuid.uuid4().hex[:8]}"
        serial = self.directory / f"{name}.serial.log"
        guest = Shaped(name, root, serial, self.conn, [root, *files])
        self.made.append(guest)
        xml = shaped_domain_xml(
            name, serial, devices, os_extra=os_extra, metadata=OTHER_TOOLS_METADATA, domain_type=DOMAIN_TYPE
        )
        if transient:
            self.conn.createXML(xml, 0)
        else:
            self.conn.defineXML(xml)
            guest.domain.create()
        guest.wait_for_console("image A")
        return guest

    async def rebuild(self, guest: Shaped, url: str, sha: str, *extra: str) -> CliResult:
        return await rebuild_cli(
            self.server.address,
            "start", guest.name, "--image", url, "--sha256", sha, "--host", self.worker.host,
            "--stop-timeout", "0", "--boot-marker", "image B", "--boot-timeout", "10", "--wait", *extra,
        )  # fmt: skip

    async def rebuild_killed_at(self, client: Client, guest: Shaped, point: str) -> dict[str, Any]:
        """A rebuild to image B whose worker is killed (SIGKILL) at kill point ``point`` and started
        again: the rebuild's result, once it finished."""
        worker = self.worker
        assert worker.pause_dir is not None
        (worker.pause_dir / point).touch()
        url, sha = self.serve("image B", "raw")
        args = ["start", guest.name, "--image", url, "--sha256", sha, "--host", worker.host,
                "--stop-timeout", "0", "--boot-marker", "image B", "--boot-timeout", "10"]  # fmt: skip
        assert (await rebuild_cli(self.server.address, *args)).code == 0
        await wait_for_file(worker.pause_dir / f"{point}.reached")
        worker.kill()
        (worker.pause_dir / point).unlink()
        worker.start()
        result: dict[str, Any] = await client.get_workflow_handle(
            rebuild_workflow_id(worker.host, guest.name)
        ).result()
        return result

    def remove_guests(self) -> None:
        for guest in self.made:
            try:
                domain = self.conn.lookupByName(guest.name)
            except libvirt.libvirtError:
                continue
            persistent = domain.isPersistent()
            if domain.isActive():
                domain.destroy()
            if persistent:
                for snapshot in domain.listAllSnapshots(0):
                    snapshot.delete(libvirt.VIR_DOMAIN_SNAPSHOT_DELETE_METADATA_ONLY)
                if domain.hasManagedSaveImage(0):
                    domain.managedSaveRemove(0)
                domain.undefine()


def data_disk(directory: Path, name: str) -> Path:
    path = directory / name
    path.write_bytes(os.urandom(64 << 10))
    return path


OUR_METADATA = "{https://github.com/durable-rebuild/rebuild/1}image"


def without_disk(definition: str, target: str) -> str:
    """The definition but for the root disk and the image record a rebuild writes (on purpose)."""
    xml = ET.fromstring(definition)
    devices = xml.find("devices")
    assert devices is not None
    for disk in devices.findall("disk"):
        found = disk.find("target")
        if found is not None and found.get("dev") == target:
            devices.remove(disk)
    metadata = xml.find("metadata")
    if metadata is not None:
        for record in metadata.findall(OUR_METADATA):
            metadata.remove(record)
        if not len(metadata):
            xml.remove(metadata)
    return ET.canonicalize(ET.tostring(xml, encoding="unicode"), strip_text=True)


def disk_of(definition: str, target: str) -> ET.Element:
    for disk in ET.fromstring(definition).findall("./devices/disk"):
        found = disk.find("target")
        if found is not None and found.get("dev") == target:
            return disk
    raise AssertionError(f"no disk {target}")


def assert_refused_before_stop(
    result: CliResult, guest: Shaped, before: str, sums: dict[str, str], domain_id: int, why: str
) -> None:
    assert result.code == 2, (result.stdout, result.stderr)
    assert why in result.stderr, result.stderr
    assert "nothing was changed" in result.stderr
    assert "Traceback" not in result.stderr
    if domain_id != -1:
        assert guest.domain.ID() == domain_id, "the instance was never stopped"
    assert "image B" not in guest.console()
    assert guest.console().count("image A") <= 1
    assert guest.definition() == before
    assert guest.checksums() == sums
