"""Issue 24, finding 3: the pre-flight sandbox is built from an allow-list, never the instance's leftovers.

Built from the instance's definition minus a deny-list, the sandbox kept (and QEMU got, as ``virsh
domxml-to-native`` shows) ``<qemu:commandline>`` extras (a user NIC with ``hostfwd``, a ``-drive`` of
another file), TPM passthrough, an RNG over TCP, evdev input from the host, an NVDIMM on a shared file,
audio to another machine, CPU pinning, hugepages and NUMA cells that overrode the memory cap; and an
instance with ``<sysinfo>`` UUIDs or memory DIMMs could never pass at all. Each definition below is
rendered by the real QEMU driver, as QEMU would be started.
"""

from __future__ import annotations

import uuid
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from activities import domain_xml as dx
from activities.errors import UnsupportedInstance
from devtools.testbed.e2e import DOMAIN_TYPE

INSTANCE_UUID = str(uuid.uuid4())
IMAGE = "/var/lib/durable-rebuild/images/" + "0" * 64
HOSTILE = f"""<domain type='{DOMAIN_TYPE}' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>vm-hostile</name>
  <uuid>{INSTANCE_UUID}</uuid>
  <maxMemory slots='4' unit='GiB'>64</maxMemory>
  <memory unit='GiB'>33</memory>
  <currentMemory unit='GiB'>33</currentMemory>
  <memoryBacking><hugepages/></memoryBacking>
  <vcpu placement='static' cpuset='0-1'>16</vcpu>
  <cputune><vcpupin vcpu='0' cpuset='1'/></cputune>
  <sysinfo type='smbios'><system><entry name='uuid'>{INSTANCE_UUID}</entry>
    <entry name='serial'>instance-serial-4711</entry></system></sysinfo>
  <os><type arch='x86_64' machine='pc'>hvm</type><smbios mode='sysinfo'/><boot dev='hd'/></os>
  <features><acpi/><apic/></features>
  <cpu mode='custom' match='exact'><model fallback='allow'>qemu64</model>
    <numa><cell id='0' cpus='0-15' memory='32' unit='GiB'/></numa></cpu>
  <devices>
    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
      <source file='/srv/instances/vm-hostile/root.qcow2'/><target dev='vda' bus='virtio'/></disk>
    <disk type='file' device='disk'><driver name='qemu' type='raw'/>
      <source file='/srv/instances/vm-hostile/data.img'/><target dev='vdb' bus='virtio'/></disk>
    <interface type='user'><mac address='52:54:00:aa:bb:01'/></interface>
    <tpm model='tpm-tis'><backend type='passthrough'><device path='/dev/tpm0'/></backend></tpm>
    <rng model='virtio'><backend model='egd' type='tcp'>
      <source mode='connect' host='203.0.113.9' service='1234'/></backend></rng>
    <input type='evdev'><source dev='/dev/input/event0'/></input>
    <sound model='ich9'><audio id='1'/></sound>
    <audio id='1' type='pulseaudio' serverName='tcp:203.0.113.9'/>
    <memory model='nvdimm'><source><path>/srv/shared/nvdimm.img</path></source>
      <target><size unit='MiB'>512</size><node>0</node></target></memory>
    <memory model='dimm'><target><size unit='GiB'>1</size><node>0</node></target></memory>
  </devices>
  <qemu:commandline>
    <qemu:arg value='-netdev'/><qemu:arg value='user,id=x,hostfwd=tcp::2222-:22'/>
    <qemu:arg value='-drive'/><qemu:arg value='file=/etc/shadow,format=raw,if=none'/>
  </qemu:commandline>
</domain>"""


def _sandbox(instance: str, tmp_path: Path, seed: bool = True) -> str:
    xml = ET.fromstring(instance)
    new_disk = dx.rebuilt_disk(dx.disk_element(xml, "vda"), IMAGE, "raw")
    return dx.sandbox_definition(
        xml,
        "rebuild-preflight-allow-list",
        new_disk,
        tmp_path / "overlay.qcow2",
        tmp_path / "console.log",
        tmp_path / "seed.iso" if seed else None,
        max_memory_mib=2048,
        description="durable-rebuild pre-flight sandbox of /var/lib/durable-rebuild",
        owner="durable-rebuild pre-flight sandbox of /var/lib/durable-rebuild",
    )


def test_the_sandbox_gets_nothing_that_reaches_the_host_or_the_instance(
    libvirt_conn: Any, tmp_path: Path
) -> None:
    sandbox = _sandbox(HOSTILE, tmp_path)
    argv = str(libvirt_conn.domainXMLToNative("qemu-argv", sandbox, 0))
    for left_out in (
        "hostfwd", "/etc/shadow", "-netdev", "tpm", "rng", "egd", "203.0.113.9", "evdev", "/dev/input",
        "nvdimm", "/srv/shared", "pulseaudio", "data.img", "root.qcow2", "hugepages",
        "memory-backend-file", "instance-serial-4711", INSTANCE_UUID, "numa", "52:54:00:aa:bb:01",
    ):  # fmt: skip
        assert left_out not in argv, f"{left_out!r} reached QEMU: {argv}"
    # The memory cap holds (NUMA cells and DIMMs no longer override it); few vCPUs, no pinning.
    assert "-m 2048" in argv or "size=2097152k" in argv, argv
    assert "-smp 4," in argv, argv
    # What it needs is there: the overlay, the seed, the console log, the machine type and CPU model.
    for kept in (str(tmp_path / "overlay.qcow2"), str(tmp_path / "seed.iso"), str(tmp_path / "console.log")):
        assert kept in argv
    assert "-machine pc" in argv and "qemu64" in argv


def test_the_sandbox_definition_names_only_allowed_elements(tmp_path: Path) -> None:
    xml = ET.fromstring(_sandbox(HOSTILE, tmp_path))
    assert {child.tag for child in xml} <= {
        "name", "uuid", "description", "metadata", "memory", "currentMemory", "vcpu", "os", "features",
        "cpu", "clock", "on_poweroff", "on_reboot", "on_crash", "devices",
    }  # fmt: skip
    assert sorted(child.tag for child in xml.find("devices") or []) == [
        "disk", "disk", "memballoon", "serial",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("change", "why"),
    [
        (("<smbios mode='sysinfo'/>", "<kernel>/boot/vmlinuz</kernel>"), "boots a host kernel"),
        (
            ("<smbios mode='sysinfo'/>", "<loader type='pflash'>/srv/instances/vm-hostile/OVMF.fd</loader>"),
            "writable firmware image",
        ),
    ],
)
def test_what_a_sandbox_cannot_have_is_refused_with_the_reason(
    tmp_path: Path, change: tuple[str, str], why: str
) -> None:
    with pytest.raises(UnsupportedInstance, match=why):
        _sandbox(HOSTILE.replace(*change), tmp_path)


def test_uefi_firmware_is_the_instances_kind_with_a_fresh_nvram(libvirt_conn: Any, tmp_path: Path) -> None:
    explicit = HOSTILE.replace(
        "<smbios mode='sysinfo'/>",
        "<loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE_4M.fd</loader>"
        "<nvram template='/usr/share/OVMF/OVMF_VARS_4M.fd'>/srv/instances/vm-hostile/VARS.fd</nvram>",
    )
    argv = str(libvirt_conn.domainXMLToNative("qemu-argv", _sandbox(explicit, tmp_path), 0))
    assert "/usr/share/OVMF/OVMF_CODE_4M.fd" in argv and "/srv/instances" not in argv
    # Autoselected firmware keeps being autoselected: libvirt refuses a loader path beside it.
    autoselected = HOSTILE.replace("<os>", "<os firmware='efi'>").replace(
        "<smbios mode='sysinfo'/>",
        "<loader readonly='yes' type='pflash' secure='yes'>/usr/share/OVMF/OVMF_CODE_4M.ms.fd</loader>",
    )
    os_element = ET.fromstring(_sandbox(autoselected, tmp_path)).find("os")
    assert os_element is not None and os_element.get("firmware") == "efi"
    assert os_element.find("loader") is None
    assert os_element.find("./firmware/feature[@name='secure-boot']") is not None
