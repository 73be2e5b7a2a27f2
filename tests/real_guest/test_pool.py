"""The real Debian guest with its root disk a volume of a libvirt dir pool: stopped gracefully, given a
new volume on the pool's copy of image B, booted on it and verified by its agent."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest

from devtools.image_server import ImageServer
from devtools.real_guest import RealGuestImages, image_sha256
from devtools.real_guest_domain import overlay, real_domain_xml
from devtools.temporal_dev import DevServer
from devtools.testbed.e2e import DOMAIN_PREFIX, Guest, WorkerProcess
from devtools.testbed.real_guest import (
    BOOT_SECONDS,
    SHARED_GUEST,
    image_in_guest,
    rebuild_verified_by_agent,
    wait_for_agent,
)

pytestmark = [pytest.mark.timeout(1800), SHARED_GUEST]


async def test_a_real_guest_on_a_pool_volume_is_rebuilt_onto_a_new_volume(
    libvirt_conn: Any,
    real_images: RealGuestImages,
    real_dir: Path,
    domain_type: str,
    real_worker: WorkerProcess,
    served: ImageServer,
    dev_server: DevServer,
) -> None:
    directory = real_dir / "pool"
    directory.mkdir()
    pool = libvirt_conn.storagePoolCreateXML(
        f"<pool type='dir'><name>{DOMAIN_PREFIX}real-pool</name>"
        f"<target><path>{directory}</path></target></pool>",
        0,
    )
    name = f"{DOMAIN_PREFIX}real-{uuid.uuid4().hex[:8]}"
    disk = overlay(real_images.a, directory / f"{name}.qcow2")
    pool.refresh(0)
    log = real_dir / f"{name}.console.log"
    xml = real_domain_xml(name, disk, log, domain_type=domain_type).replace(
        f"<disk type='file' device='disk'><driver name='qemu' type=\"qcow2\"/><source file=\"{disk}\"/>",
        f"<disk type='volume' device='disk'><driver name='qemu' type='qcow2'/>"
        f"<source pool='{pool.name()}' volume='{disk.name}'/>",
    )
    assert "type='volume'" in xml
    libvirt_conn.defineXML(xml)
    guest = Guest(libvirt_conn, name, disk, log, disk, ())
    try:
        guest.domain.create()
        guest.wait_for_console(RealGuestImages.marker("A"), 0, BOOT_SECONDS)
        wait_for_agent(guest)
        sha = image_sha256(real_images.b)

        outcome = await rebuild_verified_by_agent(real_worker, dev_server, guest, served.url("b.qcow2"), sha)
        assert "volume" in outcome["disk_mode"]
        assert image_in_guest(guest) == "B"
        pool.refresh(0)
        names = {v.name() for v in pool.listAllVolumes(0)}
        assert disk.name not in names, "the old volume went at cleanup"
        assert any(n.startswith(f"{name}-root-") for n in names)
    finally:
        guest.remove()
        pool.refresh(0)
        for volume in pool.listAllVolumes(0):
            volume.delete(0)
        pool.destroy()
