"""The host's own listing of its instances (``list_instances``) on libvirt's ``test:///`` driver: one
instance a rebuild cannot take is reported with the reason, and never fails the whole host's listing."""

from __future__ import annotations

from pathlib import Path

from activities.inventory import InventoryActivities
from devtools.testbed.libvirt_test_driver import make_instances
from workflows.activity_models import ListInstancesInput


async def test_an_instance_whose_root_disk_is_missing_is_listed_with_the_reason(tmp_path: Path) -> None:
    instances = make_instances(tmp_path, ["vm-1", "vm-2"])
    conn = instances[0].libvirt.connection()
    (tmp_path / "pool").mkdir()
    pool = f"<pool type='dir'><name>pool-1</name><target><path>{tmp_path / 'pool'}</path></target></pool>"
    conn.storagePoolDefineXML(pool, 0).create(0)
    xml = conn.lookupByName("vm-2").XMLDesc(0)
    xml = xml.replace("<disk type='file' device='disk'>", "<disk type='volume' device='disk'>", 1)
    xml = xml.replace(f"<source file='{instances[1].disk}'", "<source pool='pool-1' volume='root'", 1)
    conn.defineXML(xml)
    listing = await InventoryActivities(instances[0].libvirt).list_instances(ListInstancesInput())
    vm1, vm2 = listing.instances
    assert (vm1.instance, vm1.root_disk, vm1.refusal, vm1.state) == ("vm-1", "file", None, "running")
    assert (vm2.instance, vm2.root_disk) == ("vm-2", "volume")
    assert vm2.refusal == "root disk pool-1/root of 'vm-2' does not exist"
