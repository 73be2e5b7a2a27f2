"""The host as its distribution ships it: QEMU runs as an unprivileged user under its security driver.

These tests fail on a host whose qemu.conf runs QEMU as root: a test that passes only because QEMU can
open anything would hide the very problems operators meet.
"""

from __future__ import annotations

import os
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

from devtools.image_server import ImageServer
from devtools.temporal_dev import DevServer
from devtools.testbed.e2e import Guest, WorkerProcess, rebuild_cli, serve
from tests.test_faults import assert_nothing_left, assert_runs, start_args

QEMU_CONF = Path("/etc/libvirt/qemu.conf")


def qemu_process_user(guest: Guest) -> str:
    """The user the guest's QEMU process runs as, read from /proc."""
    pid = (Path("/run/libvirt/qemu") / f"{guest.name}.pid").read_text().strip()
    uid = os.stat(f"/proc/{pid}").st_uid
    return subprocess.run(["id", "-nu", str(uid)], capture_output=True, text=True, check=True).stdout.strip()


def test_guests_run_as_the_distributions_unprivileged_user(guest: Guest) -> None:
    assert qemu_process_user(guest) != "root"
    labels = ET.fromstring(guest.domain.XMLDesc(0)).findall("./seclabel")
    assert any(label.get("model") == "dac" for label in labels), "libvirt's DAC driver labels the guest"


def test_setup_never_made_qemu_root() -> None:
    settings = [
        line.split("#")[0].replace(" ", "")
        for line in QEMU_CONF.read_text().splitlines()
        if not line.lstrip().startswith("#")
    ]
    assert 'user="root"' not in settings
    assert 'security_driver="none"' not in settings


async def test_a_disk_qemu_cannot_open_fails_at_start_names_it_and_rolls_back(
    guest: Guest,
    dev_server: DevServer,
    unique_host: str,
    images: ImageServer,
    tmp_path: Path,
) -> None:
    # The worker's image cache inside a 0700 directory: the new root disk's backing image is out of
    # QEMU's reach, as on a host whose state directory was made with a tight umask.
    hidden = tmp_path / "hidden"
    hidden.mkdir(mode=0o700)
    own = WorkerProcess(unique_host, hidden / "state", dev_server.address, tmp_path / "w.log")
    own.start()
    try:
        since = len(guest.console())
        url, sha = serve(images, "image B", "raw")
        result = await rebuild_cli(dev_server.address, *start_args(guest, own, url, sha, "--wait"))
        assert result.code == 1, result.stdout + result.stderr
        assert "failed at start" in result.stderr
        assert str(hidden / "state" / "images" / sha) in result.stderr
        assert "Permission denied" in result.stderr
        assert "rolled back" in result.stderr
        assert_runs(guest, "image A", since)
        assert guest.root_format() == "raw"
        assert guest.domain.isActive()
        assert_nothing_left(guest, own)
    finally:
        own.stop()
