"""Hypervisor activities against libvirt's real ``test:///`` driver, a fresh node file per test."""

from __future__ import annotations

import subprocess
from datetime import UTC, datetime
from pathlib import Path

import libvirt
import pytest
from temporalio.testing import ActivityEnvironment

from activities.errors import BootCheckFailed, InstanceNotFound, InvalidRequest, UnsupportedInstance
from activities.hypervisor import HypervisorActivities
from activities.state import StateDir
from devtools.testbed.libvirt_test_driver import DriverInstance, make_instance, make_instances
from workflows.models import (
    InspectInstanceInput,
    RecordImageInput,
    StartInstanceInput,
    StopInstanceInput,
    VerifyInstanceInput,
    VerifySpec,
)

env = ActivityEnvironment()
REBUILD_ID = "rebuild-under-test"


async def booted(tmp_path: Path, vm: DriverInstance, console: bytes = b"") -> HypervisorActivities:
    """The instance started by a rebuild (its start recorded), after an earlier boot printed ``console``."""
    state = StateDir(tmp_path / "state")
    state.create()
    hypervisor = HypervisorActivities(vm.libvirt, state=state)
    vm.libvirt.domain(vm.name).force_off()
    vm.serial.write_bytes(console)
    await env.run(hypervisor.start_instance, StartInstanceInput(instance=vm.name, rebuild_id=REBUILD_ID))
    return hypervisor


async def test_inspect_reads_the_definition(tmp_path: Path) -> None:
    vm = make_instance(tmp_path)
    info = await env.run(
        HypervisorActivities(vm.libvirt).inspect_instance, InspectInstanceInput(instance="vm-1")
    )
    assert info.uuid == "11111111-2222-3333-4444-000000000000"
    assert info.was_running
    assert info.root_disk_path == str(vm.disk)
    assert info.root_disk_format == "raw"
    assert info.root_disk_target == "vda"
    assert info.current_image_sha256 is None


async def test_inspect_finds_the_boot_disk_when_it_is_not_first(tmp_path: Path) -> None:
    vm = make_instance(tmp_path, root_first=False)
    info = await env.run(
        HypervisorActivities(vm.libvirt).inspect_instance, InspectInstanceInput(instance="vm-1")
    )
    assert info.root_disk_path == str(vm.disk)


@pytest.mark.parametrize("how", ["as its disk", "as a qcow2 backing file"])
async def test_inspect_refuses_a_root_disk_another_domain_uses(tmp_path: Path, how: str) -> None:
    """A linked clone reads the root disk as its base: replacing that file would change its disk."""
    first, second = make_instances(tmp_path, ["vm-1", "vm-2"])
    conn = first.libvirt.connection()
    used = first.disk
    if how == "as a qcow2 backing file":
        used = tmp_path / "clone.qcow2"
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", "-b", first.disk.name, "-F", "raw", str(used)],
            check=True,
        )
    xml = conn.lookupByName("vm-2").XMLDesc(0)
    conn.defineXML(xml.replace(f"<source file='{second.data_disk}'", f"<source file='{used}'", 1))

    with pytest.raises(UnsupportedInstance, match=r"is shared: disk vdb of domain 'vm-2'") as caught:
        await env.run(
            HypervisorActivities(first.libvirt).inspect_instance, InspectInstanceInput(instance="vm-1")
        )
    assert caught.value.non_retryable


async def test_inspect_refuses_paused_transient_and_snapshotted_instances(tmp_path: Path) -> None:
    vm = make_instance(tmp_path)
    conn = vm.libvirt.connection()
    hypervisor = HypervisorActivities(vm.libvirt)
    inspect = InspectInstanceInput(instance="vm-1")
    conn.lookupByName("vm-1").suspend()
    with pytest.raises(UnsupportedInstance, match="is paused"):
        await env.run(hypervisor.inspect_instance, inspect)
    conn.lookupByName("vm-1").resume()
    conn.lookupByName("vm-1").snapshotCreateXML("<domainsnapshot><name>s1</name></domainsnapshot>", 0)
    with pytest.raises(UnsupportedInstance, match=r"snapshots \(s1\)"):
        await env.run(hypervisor.inspect_instance, inspect)
    discarding = InspectInstanceInput(instance="vm-1", discard_snapshots=True)
    assert (await env.run(hypervisor.inspect_instance, discarding)).root_disk_target == "vda"
    conn.lookupByName("vm-1").undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA)
    with pytest.raises(UnsupportedInstance, match="transient"):
        await env.run(hypervisor.inspect_instance, inspect)


async def test_inspect_takes_the_operators_root_disk_and_checks_the_name(tmp_path: Path) -> None:
    vm = make_instance(tmp_path)
    hypervisor = HypervisorActivities(vm.libvirt)
    info = await env.run(hypervisor.inspect_instance, InspectInstanceInput(instance="vm-1", root_disk="vdb"))
    assert info.root_disk_path == str(vm.data_disk)
    with pytest.raises(InvalidRequest, match="not a disk target"):
        await env.run(hypervisor.inspect_instance, InspectInstanceInput(instance="vm-1", root_disk="../x"))


async def test_inspect_unknown_instance_is_not_retryable(tmp_path: Path) -> None:
    vm = make_instance(tmp_path)
    with pytest.raises(InstanceNotFound) as caught:
        await env.run(
            HypervisorActivities(vm.libvirt).inspect_instance, InspectInstanceInput(instance="nope")
        )
    assert caught.value.non_retryable
    assert "'nope'" in caught.value.message


async def test_inspect_refuses_a_block_device_no_pool_manages(tmp_path: Path) -> None:
    vm = make_instance(tmp_path)
    conn = vm.libvirt.connection()
    xml = conn.lookupByName("vm-1").XMLDesc(0)
    xml = xml.replace("<disk type='file' device='disk'>", "<disk type='block' device='disk'>", 1)
    xml = xml.replace(f"<source file='{vm.disk}'", "<source dev='/dev/sdz'", 1)
    conn.defineXML(xml)
    with pytest.raises(UnsupportedInstance, match="/dev/sdz, which belongs to no libvirt storage pool"):
        await env.run(
            HypervisorActivities(vm.libvirt).inspect_instance, InspectInstanceInput(instance="vm-1")
        )


async def test_stop_is_idempotent_and_reports_the_console_offset(tmp_path: Path) -> None:
    vm = make_instance(tmp_path)
    vm.serial.write_bytes(b"old image\r\n")
    hypervisor = HypervisorActivities(vm.libvirt)
    first = await env.run(hypervisor.stop_instance, StopInstanceInput(instance="vm-1", timeout_seconds=5))
    assert first.was_running
    assert first.console_offset == len(b"old image\r\n")
    assert not vm.libvirt.connection().lookupByName("vm-1").isActive()
    again = await env.run(hypervisor.stop_instance, StopInstanceInput(instance="vm-1", timeout_seconds=5))
    assert not again.was_running
    assert not again.forced


async def test_start_is_idempotent(tmp_path: Path) -> None:
    vm = make_instance(tmp_path, running=False)
    hypervisor = HypervisorActivities(vm.libvirt)
    first = await env.run(hypervisor.start_instance, StartInstanceInput(instance="vm-1"))
    assert not first.already_running
    assert vm.libvirt.connection().lookupByName("vm-1").isActive()
    second = await env.run(hypervisor.start_instance, StartInstanceInput(instance="vm-1"))
    assert second.already_running


async def test_verify_reads_only_this_boots_console_output(tmp_path: Path) -> None:
    vm = make_instance(tmp_path)
    # An earlier boot printed it: it must not count, whatever offset the request claims.
    hypervisor = await booted(tmp_path, vm, b"image B\r\n")
    check = VerifyInstanceInput(
        instance="vm-1", boot_marker="image B", boot_timeout_seconds=0.5, rebuild_id=REBUILD_ID
    )
    with pytest.raises(BootCheckFailed, match="did not print"):
        await env.run(hypervisor.verify_instance, check)
    with open(vm.serial, "ab") as log:
        log.write(b"image B\r\n")
    await env.run(hypervisor.verify_instance, check)


async def test_verify_fails_when_the_instance_is_off(tmp_path: Path) -> None:
    vm = make_instance(tmp_path, running=False)
    hypervisor = await booted(tmp_path, vm)
    vm.libvirt.domain("vm-1").force_off()
    with pytest.raises(BootCheckFailed, match="not running"):
        await env.run(hypervisor.verify_instance, VerifyInstanceInput(instance="vm-1", rebuild_id=REBUILD_ID))


async def test_record_image_is_seen_by_the_next_inspect(tmp_path: Path) -> None:
    vm = make_instance(tmp_path)
    hypervisor = HypervisorActivities(vm.libvirt)
    record = RecordImageInput(
        instance="vm-1", image_sha256="cd" * 32, image_url="http://x/y", rebuilt_at=datetime.now(UTC)
    )
    await env.run(hypervisor.record_image, record)
    info = await env.run(hypervisor.inspect_instance, InspectInstanceInput(instance="vm-1"))
    assert info.current_image_sha256 == "cd" * 32


async def test_stop_says_how_the_instance_went_off(tmp_path: Path) -> None:
    vm = make_instance(tmp_path)
    hypervisor = HypervisorActivities(vm.libvirt)
    graceful = await env.run(hypervisor.stop_instance, StopInstanceInput(instance="vm-1", timeout_seconds=5))
    assert (graceful.stopped_by, graceful.forced) == ("acpi", False)
    await env.run(hypervisor.start_instance, StartInstanceInput(instance="vm-1"))
    forced = await env.run(hypervisor.stop_instance, StopInstanceInput(instance="vm-1", timeout_seconds=0))
    assert (forced.stopped_by, forced.forced) == ("forced", True)
    off = await env.run(hypervisor.stop_instance, StopInstanceInput(instance="vm-1", timeout_seconds=5))
    assert off.stopped_by is None


async def test_verify_without_a_mode_checks_that_a_domain_without_agent_keeps_running(tmp_path: Path) -> None:
    vm = make_instance(tmp_path)
    result = await env.run(
        (await booted(tmp_path, vm)).verify_instance,
        VerifyInstanceInput(instance="vm-1", boot_timeout_seconds=0.3, rebuild_id=REBUILD_ID),
    )
    assert result is not None
    assert result.verified_by == "running:0.3"
    assert result.seconds >= 0.3


async def test_verify_console_regex_reads_the_file_console_of_this_boot(tmp_path: Path) -> None:
    vm = make_instance(tmp_path)
    hypervisor = await booted(tmp_path, vm, b"real image B reached multi-user\r\n")
    check = VerifyInstanceInput(
        instance="vm-1", verify="console:image [AB] reached", boot_timeout_seconds=0.5, rebuild_id=REBUILD_ID
    )
    with pytest.raises(BootCheckFailed, match="did not print"):
        await env.run(hypervisor.verify_instance, check)
    with open(vm.serial, "ab") as log:
        log.write(b"real image A reached multi-user\r\n")
    result = await env.run(hypervisor.verify_instance, check)
    assert result is not None
    assert (result.verified_by, result.detail) == ("console:image [AB] reached", "image A reached")


async def test_verify_by_agent_needs_the_agent_channel(tmp_path: Path) -> None:
    vm = make_instance(tmp_path)
    hypervisor = await booted(tmp_path, vm)
    with pytest.raises(UnsupportedInstance, match="no guest agent channel"):
        await env.run(
            hypervisor.verify_instance,
            VerifyInstanceInput(
                instance="vm-1", verify="agent", boot_timeout_seconds=0.3, rebuild_id=REBUILD_ID
            ),
        )


@pytest.mark.parametrize(
    ("text", "label"),
    [("agent", "agent"), ("console:real image B", "console:real image B"), ("running:30", "running:30")],
)
def test_verify_modes_are_parsed(text: str, label: str) -> None:
    assert VerifySpec.parse(text).label() == label


@pytest.mark.parametrize("text", ["agent:1", "console:", "console:(", "running:x", "running:-1", "ping"])
def test_bad_verify_modes_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        VerifySpec.parse(text)
