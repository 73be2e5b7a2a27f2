"""Domains for the real Linux guest (see ``devtools.real_guest``): the devices real instances have.

A pty serial console (as most real domains have, mirrored into a log file so a person can read it), a
guest agent channel, NICs and data disks. KVM where ``/dev/kvm`` is usable and the guest boots under it;
TCG otherwise (nested KVM hit an emulation failure in extlinux's real-mode code).
"""

from __future__ import annotations

import os
import subprocess
import uuid
from pathlib import Path
from xml.sax.saxutils import quoteattr

from devtools.guest import disk_and_nic_xml

# TCG unless told otherwise: under nested KVM extlinux stops with "emulation failure".
DOMAIN_TYPE = os.environ.get("REBUILD_REAL_GUEST_DOMAIN_TYPE", "qemu")


def overlay(base: Path, path: Path) -> Path:
    """A qcow2 disk at ``path`` that starts as ``base`` (read-only backing file, shared by many)."""
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(path)],
        check=True,
        stdin=subprocess.DEVNULL,
    )
    return path


def real_domain_xml(
    name: str,
    root_disk: Path,
    serial_log: Path,
    *,
    root_format: str = "qcow2",
    data_disks: tuple[Path, ...] = (),
    macs: tuple[str, ...] = ("52:54:00:12:34:56",),
    domain_type: str = DOMAIN_TYPE,
    memory_mib: int = 512,
    vcpus: int = 1,
    agent: bool = True,
    instance_uuid: str | None = None,
) -> str:
    disks, nics = disk_and_nic_xml(root_disk, root_format, data_disks, macs)
    channel = (
        "<channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>"
        if agent
        else ""
    )
    return f"""<domain type={quoteattr(domain_type)}>
  <name>{name}</name>
  <uuid>{instance_uuid or uuid.uuid4()}</uuid>
  <memory unit='MiB'>{memory_mib}</memory>
  <vcpu>{vcpus}</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <features><acpi/></features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    {disks}
    {nics}
    <serial type='pty'><log file={quoteattr(str(serial_log))} append='on'/><target port='0'/></serial>
    <console type='pty'><target type='serial' port='0'/></console>
    {channel}
    <video><model type='none'/></video>
    <memballoon model='none'/>
  </devices>
</domain>"""
