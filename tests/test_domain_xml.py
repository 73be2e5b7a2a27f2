"""Which disk is the root disk, and what its new definition says: libvirt's rules, on XML alone."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from activities import domain_xml as dx
from activities.errors import UnsupportedInstance


def domain(devices: str, os_extra: str = "") -> ET.Element:
    return dx.parse(
        f"<domain type='kvm'><name>vm</name><os><type arch='x86_64'>hvm</type>{os_extra}</os>"
        f"<devices>{devices}</devices></domain>"
    )


def disk(target: str, path: str = "", boot: int | None = None, device: str = "disk", extra: str = "") -> str:
    source = f"<source file='{path or '/d/' + target}'/>" if path != "-" else ""
    order = f"<boot order='{boot}'/>" if boot is not None else ""
    return (
        f"<disk type='file' device='{device}'><driver name='qemu' type='raw'/>{source}"
        f"<target dev='{target}' bus='virtio'/>{order}{extra}</disk>"
    )


def nic(boot: int | None = None) -> str:
    order = f"<boot order='{boot}'/>" if boot is not None else ""
    return f"<interface type='network'><mac address='52:54:00:00:00:01'/>{order}</interface>"


def root(xml: ET.Element, target: str | None = None) -> str:
    return dx.root_disk(xml, "vm", target).target


def test_per_device_boot_order_passes_over_nics_and_takes_the_first_disk_in_order() -> None:
    xml = domain(disk("vda") + disk("vdb", boot=2) + nic(boot=1))
    assert root(xml) == "vdb"


def test_os_boot_hd_is_the_first_disk_in_the_definition_and_network_first_is_passed_over() -> None:
    assert root(domain(disk("vda") + disk("vdb"), "<boot dev='network'/><boot dev='hd'/>")) == "vda"
    assert root(domain(disk("sdb") + disk("sda"))) == "sdb", "libvirt's order, not the names'"


def test_an_empty_cdrom_and_the_rebuild_seed_are_no_boot_candidates() -> None:
    empty = disk("hdc", "-", device="cdrom")
    seed = disk("hdd", "/d/seed.iso", device="cdrom", extra="<alias name='ua-rebuild-seed'/>")
    assert root(domain(empty + seed + disk("vda"), "<boot dev='cdrom'/><boot dev='hd'/>")) == "vda"
    first_seed = seed.replace("</disk>", "<boot order='1'/></disk>")
    assert root(domain(first_seed + disk("vda", boot=2))) == "vda"


def test_a_cdrom_with_media_or_a_passed_through_device_first_leaves_the_root_disk_uncertain() -> None:
    iso = disk("hdc", "/iso/installer.iso", device="cdrom")
    with pytest.raises(UnsupportedInstance, match=r"cdrom hdc before any disk.*--root-disk"):
        root(domain(iso + disk("vda"), "<boot dev='cdrom'/><boot dev='hd'/>"))
    hostdev = "<hostdev mode='subsystem' type='pci'><boot order='1'/></hostdev>"
    with pytest.raises(UnsupportedInstance, match="hostdev before any disk"):
        root(domain(hostdev + disk("vda", boot=2)))
    assert root(domain(iso + disk("vda"), "<boot dev='cdrom'/>"), "vda") == "vda"


def test_nothing_bootable_a_host_kernel_or_an_unknown_target_is_refused() -> None:
    with pytest.raises(UnsupportedInstance, match="boots from no disk"):
        root(domain(disk("vda") + nic(boot=1)))
    with pytest.raises(UnsupportedInstance, match="kernel from the host"):
        root(domain(disk("vda"), "<kernel>/boot/vmlinuz</kernel>"))
    with pytest.raises(UnsupportedInstance, match=r"no disk 'vdz'.*vda"):
        root(domain(disk("vda")), "vdz")
    with pytest.raises(UnsupportedInstance, match="hdc is a cdrom"):
        root(domain(disk("vda") + disk("hdc", device="cdrom")), "hdc")


@pytest.mark.parametrize(
    ("extra", "why"),
    [
        ("<shareable/>", "shareable"),
        ("<readonly/>", "read-only"),
        ("<transient/>", "transient"),
        ("<encryption format='luks'/>", "encrypted"),
    ],
)
def test_disk_shapes_an_overlay_cannot_replace_are_refused(extra: str, why: str) -> None:
    with pytest.raises(UnsupportedInstance, match=why):
        root(domain(disk("vda", extra=extra)))


def test_each_kind_of_root_disk_says_where_it_is_and_other_kinds_are_refused() -> None:
    block = "<disk type='block' device='disk'><source dev='/dev/sdz'/><target dev='vda'/></disk>"
    volume = "<disk type='volume' device='disk'><source pool='p' volume='v'/><target dev='vda'/></disk>"
    rbd = "<disk type='network' device='disk'><source protocol='rbd' name='r/i'/><target dev='vda'/></disk>"
    for xml, where, kind in (
        (block, "/dev/sdz", "block"),
        (volume, "p/v", "volume"),
        (rbd, "rbd:r/i", "network"),
    ):
        found = dx.root_disk(domain(xml), "vm")
        assert (found.path, found.kind) == (where, kind)
    nbd = rbd.replace("protocol='rbd'", "protocol='nbd'")
    with pytest.raises(UnsupportedInstance, match="over 'nbd'"):
        root(domain(nbd))
    with pytest.raises(UnsupportedInstance, match="type 'dir'"):
        root(domain("<disk type='dir' device='disk'><source dir='/d'/><target dev='vda'/></disk>"))
    with pytest.raises(UnsupportedInstance, match="vmdk"):
        root(domain(disk("vda").replace("type='raw'", "type='vmdk'")))


def test_the_new_disk_keeps_the_device_and_spells_out_the_new_chain() -> None:
    old = dx.parse(
        "<disk type='file' device='disk'><driver name='qemu' type='qcow2' cache='none' io='native'/>"
        "<source file='/d/root.qcow2' index='3'><seclabel model='dac' relabel='no'/>"
        "<dataStore type='file'><format type='raw'/><source file='/d/data'/></dataStore>"
        "<slices><slice type='storage' offset='0' size='1048576'/></slices></source>"
        "<backingStore type='file' index='2'><format type='raw'/><source file='/d/old-base'/>"
        "<backingStore/></backingStore><target dev='vda' bus='virtio'/><serial>ROOT-1</serial>"
        "<iotune><total_iops_sec>500</total_iops_sec></iotune><boot order='1'/>"
        "<address type='pci' domain='0x0000' bus='0x00' slot='0x07' function='0x0'/></disk>"
    )
    new = dx.rebuilt_disk(old, "/cache/abc", "raw")
    assert dx.chain(new) == [("/d/root.qcow2", "qcow2"), ("/cache/abc", "raw")]
    driver = new.find("driver")
    assert driver is not None and driver.attrib == {
        "name": "qemu",
        "type": "qcow2",
        "cache": "none",
        "io": "native",
    }
    source = new.find("source")
    assert source is not None and source.attrib == {"file": "/d/root.qcow2"}
    assert [c.tag for c in source] == ["seclabel"], "the old file's data store is not the new disk's"
    for kept in ("serial", "iotune", "boot", "address", "target"):
        assert ET.tostring(new.find(kept)) == ET.tostring(old.find(kept))  # type: ignore[arg-type]
    assert "old-base" not in dx.to_string(new)


def test_other_tools_metadata_keeps_its_namespace_prefix() -> None:
    text = (
        "<domain><name>vm</name><metadata><libosinfo:libosinfo "
        "xmlns:libosinfo='http://libosinfo.org/xmlns/libvirt/domain/1.0'><libosinfo:os id='x'/>"
        "</libosinfo:libosinfo></metadata><devices/></domain>"
    )
    assert '<libosinfo:os id="x" />' in dx.to_string(dx.parse(text))
