"""Domains shaped the way operators' tools define them, on a real libvirtd with boot-sector guests.

Each shape is rebuilt correctly or refused before the stop. A rebuild proves which image booted (the
console), that every other disk is byte for byte what it was, that the definition describes the new
disk (its chain spelled out, down to the cached image) and that nothing else in it changed. A refusal
proves the instance was never stopped: same domain ID, no new boot on its console, same definition.
"""

from __future__ import annotations

import os
import subprocess
import time
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path
from xml.sax.saxutils import quoteattr

import libvirt
import pytest

from devtools.guest import write_image
from devtools.testbed.e2e import CliResult
from devtools.testbed.shapes import (
    Bed,
    Shaped,
    assert_refused_before_stop,
    data_disk,
    disk_of,
    disk_xml,
    without_disk,
)


def assert_describes_new_disk(disk: ET.Element, path: Path, cached: Path, image_format: str) -> None:
    """The root disk's definition: a qcow2 overlay at its old path on the cached image, nothing else."""
    driver, source, backing = disk.find("driver"), disk.find("source"), disk.find("backingStore")
    assert driver is not None and driver.get("type") == "qcow2"
    assert source is not None and source.get("file") == str(path)
    assert backing is not None, "the new disk's chain is spelled out"
    base_format, base_source = backing.find("format"), backing.find("source")
    assert base_format is not None and base_format.get("type") == image_format
    assert base_source is not None and base_source.get("file") == str(cached)
    end = backing.find("backingStore")
    assert end is not None and end.find("source") is None, "the cached image has no backing file"


def assert_rebuilt(
    result: CliResult, guest: Shaped, target: str, before: str, sums: dict[str, str], cache: Path, sha: str
) -> None:
    assert result.code == 0, result.stderr
    console = guest.console()
    assert console.rindex("image B") > console.rindex("image A"), "the new image booted"
    assert guest.checksums(but=guest.root) == sums, "every other disk is unchanged"
    after = guest.definition()
    assert without_disk(after, target) == without_disk(before, target), "nothing else was changed"
    assert "<libosinfo:os id=" in after, "other tools' metadata keeps its prefix"
    assert_describes_new_disk(disk_of(after, target), _defined_path(before, target), cache / sha, "raw")
    # What QEMU really opened: the live definition's chain ends at the cached image.
    live = disk_of(guest.domain.XMLDesc(0), target)
    chain = [s.get("file") for s in live.iter("source")]
    assert chain == [str(_defined_path(before, target)), str(cache / sha)]
    leftovers = list(Path(os.path.realpath(guest.root)).parent.glob("*.rebuild-*"))
    assert leftovers == []


def _defined_path(definition: str, target: str) -> Path:
    source = disk_of(definition, target).find("source")
    assert source is not None
    return Path(str(source.get("file")))


async def test_the_root_disk_is_the_first_disk_in_the_boot_order_not_the_first_disk(
    bed: Bed,
) -> None:
    """PXE first, then vdb; vda is a data disk without a boot order (it was the one replaced)."""
    data = data_disk(bed.directory, "data.img")
    root = write_image(bed.directory / "root.img", "image A", size=4 << 20)
    devices = (
        disk_xml(data, "vda")
        + disk_xml(root, "vdb", extra="<boot order='2'/>")
        + "<interface type='user'><mac address='52:54:00:ab:00:01'/><model type='virtio'/>"
        "<boot order='1'/><rom enabled='no'/></interface>"
    )
    guest = bed.define(root, devices, files=(data,))
    before, sums = guest.definition(), guest.checksums(but=root)
    url, sha = bed.serve("image B", "raw")

    result = await bed.rebuild(guest, url, sha)

    assert_rebuilt(result, guest, "vdb", before, sums, bed.cache, sha)
    assert disk_of(guest.definition(), "vda").find("backingStore") is None


async def test_a_cdrom_with_media_first_in_the_boot_order_needs_the_operators_word(
    bed: Bed,
) -> None:
    """An installer ISO left attached before the disk: which one boots is not the rebuild's guess."""
    iso = bed.directory / "installer.iso"
    iso.write_bytes(b"\0" * (1 << 20))
    root = write_image(bed.directory / "root.img", "image A", size=4 << 20)
    devices = (
        "<disk type='file' device='cdrom'><driver name='qemu' type='raw'/>"
        f"<source file={quoteattr(str(iso))}/><target dev='hdc' bus='ide'/><readonly/>"
        "<boot order='1'/></disk>" + disk_xml(root, "vda", extra="<boot order='2'/>")
    )
    guest = bed.define(root, devices, files=(iso,))
    before, sums, domain_id = guest.definition(), guest.checksums(), guest.domain.ID()
    url, sha = bed.serve("image B", "raw")

    refused = await bed.rebuild(guest, url, sha)
    assert_refused_before_stop(refused, guest, before, sums, domain_id, "--root-disk TARGET")
    assert "cdrom hdc" in refused.stderr

    result = await bed.rebuild(guest, url, sha, "--root-disk", "vda")
    assert_rebuilt(result, guest, "vda", before, guest.checksums(but=root), bed.cache, sha)


@pytest.mark.parametrize("chain", ["old base", "no base"])
async def test_a_definition_that_spells_out_its_chain_gets_the_new_chain(
    bed: Bed,
    chain: str,
) -> None:
    """As `virsh dumpxml` of a running domain prints it: <backingStore> naming the old base, or
    <backingStore/> for none. Kept, QEMU booted the old base, or an empty disk."""
    if chain == "old base":
        base = write_image(bed.directory / "base-a.raw", "image A", size=4 << 20)
        root = bed.directory / "root.qcow2"
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "raw", str(root)], check=True
        )
        written = (
            f"<backingStore type='file'><format type='raw'/><source file={quoteattr(str(base))}/>"
            "<backingStore/></backingStore>"
        )
        files: tuple[Path, ...] = (base,)
    else:
        root = write_image(bed.directory / "root.qcow2", "image A", fmt="qcow2", size=4 << 20)
        written, files = "<backingStore/>", ()
    devices = disk_xml(root, "vda", "qcow2", extra=written + "<boot order='1'/>")
    guest = bed.define(root, devices, files=files)
    before, sums = guest.definition(), guest.checksums(but=root)
    assert disk_of(before, "vda").find("backingStore") is not None
    url, sha = bed.serve("image B", "raw")

    result = await bed.rebuild(guest, url, sha)

    assert_rebuilt(result, guest, "vda", before, sums, bed.cache, sha)


async def test_a_managed_save_image_is_refused_before_anything(
    bed: Bed,
) -> None:
    root = write_image(bed.directory / "root.img", "image A", size=4 << 20)
    guest = bed.define(root, disk_xml(root, "vda", extra="<boot order='1'/>"))
    guest.domain.managedSave(0)
    before, sums = guest.definition(), guest.checksums()
    url, sha = bed.serve("image B", "raw")

    result = await bed.rebuild(guest, url, sha)

    assert_refused_before_stop(result, guest, before, sums, -1, "managed save image")
    assert guest.domain.hasManagedSaveImage(0) == 1
    assert not guest.domain.isActive()


async def test_snapshots_are_refused_unless_discarded_and_a_rollback_keeps_them(
    bed: Bed,
) -> None:
    root = write_image(bed.directory / "root.qcow2", "image A", fmt="qcow2", size=4 << 20)
    guest = bed.define(root, disk_xml(root, "vda", "qcow2", extra="<boot order='1'/>"))
    # As `virsh snapshot-create-as`: internal, with the running guest's memory.
    guest.domain.snapshotCreateXML("<domainsnapshot><name>before-upgrade</name></domainsnapshot>", 0)
    before, sums, domain_id = guest.definition(), guest.checksums(), guest.domain.ID()
    good_url, good_sha = bed.serve("image B", "raw")

    refused = await bed.rebuild(guest, good_url, good_sha)
    assert_refused_before_stop(refused, guest, before, sums, domain_id, "before-upgrade")
    assert "--discard-snapshots" in refused.stderr

    # Discarded, but the image does not boot: the rollback brings the disk and its snapshot back.
    bad_url, bad_sha = bed.serve("image C", "raw")
    rolled_back = await bed.rebuild(guest, bad_url, bad_sha, "--discard-snapshots")
    assert rolled_back.code == 1, rolled_back.stderr
    assert "rolled back" in rolled_back.stderr
    guest.wait_for_console("image A", after=guest.console().index("image C"))
    assert guest.domain.snapshotListNames(0) == ["before-upgrade"]
    listed = subprocess.run(
        ["qemu-img", "snapshot", "-U", "-l", str(root)], capture_output=True, text=True, check=True
    )
    assert "before-upgrade" in listed.stdout
    assert guest.definition() == before

    before = guest.definition()
    rebuilt = await bed.rebuild(guest, good_url, good_sha, "--discard-snapshots")
    assert_rebuilt(rebuilt, guest, "vda", before, {}, bed.cache, good_sha)
    assert guest.domain.snapshotListNames(0) == []


async def test_a_transient_domain_is_refused_and_keeps_running(
    bed: Bed,
) -> None:
    root = write_image(bed.directory / "root.img", "image A", size=4 << 20)
    devices = disk_xml(root, "vda", extra="<boot order='1'/>")
    guest = bed.define(root, devices, transient=True)
    before, sums, domain_id = guest.definition(), guest.checksums(), guest.domain.ID()
    url, sha = bed.serve("image B", "raw")

    result = await bed.rebuild(guest, url, sha)

    assert_refused_before_stop(result, guest, before, sums, domain_id, "transient")
    assert guest.domain.isActive()


async def test_a_paused_domain_is_refused_and_stays_paused(
    bed: Bed,
) -> None:
    root = write_image(bed.directory / "root.img", "image A", size=4 << 20)
    guest = bed.define(root, disk_xml(root, "vda", extra="<boot order='1'/>"))
    guest.domain.suspend()
    before, sums, domain_id = guest.definition(), guest.checksums(), guest.domain.ID()
    url, sha = bed.serve("image B", "raw")

    began = time.monotonic()
    result = await bed.rebuild(guest, url, sha)

    assert_refused_before_stop(result, guest, before, sums, domain_id, "paused")
    assert time.monotonic() - began < 30, "refused at once, not after a stop's retries"
    assert guest.domain.state()[0] == libvirt.VIR_DOMAIN_PAUSED


@pytest.mark.parametrize("shape", ["shareable", "luks"])
async def test_disks_libvirt_would_refuse_as_an_overlay_are_refused_before_the_stop(
    bed: Bed,
    shape: str,
) -> None:
    """A shareable raw disk (libvirt refuses a qcow2 one) and a LUKS-encrypted qcow2 disk (a new
    overlay would be a plain one): both were found only after the stop, at define or at start."""
    secret = None
    if shape == "shareable":
        root = write_image(bed.directory / "root.img", "image A", size=4 << 20)
        devices = disk_xml(root, "vda", extra="<shareable/><boot order='1'/>").replace(
            "type='raw'/>", "type='raw' cache='none'/>", 1
        )
        why = "shareable"
    else:
        plain = write_image(bed.directory / "plain.raw", "image A", size=4 << 20)
        root = bed.directory / "root.qcow2"
        subprocess.run(
            [
                "qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2",
                "--object", "secret,id=sec0,data=passphrase",
                "-o", "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
                str(plain), str(root),
            ],
            check=True,
            capture_output=True,
        )  # fmt: skip
        plain.unlink()
        secret_uuid = str(uuid.uuid4())
        secret = bed.conn.secretDefineXML(
            f"<secret ephemeral='no' private='yes'><uuid>{secret_uuid}</uuid>"
            f"<usage type='volume'><volume>{root}</volume></usage></secret>"
        )
        secret.setValue(b"passphrase")
        devices = disk_xml(
            root,
            "vda",
            "qcow2",
            extra="<boot order='1'/>",
            source_extra=f"<encryption format='luks'><secret type='passphrase' uuid='{secret_uuid}'/>"
            "</encryption>",
        )
        why = "encrypted"
    try:
        guest = bed.define(root, devices)
        before, sums, domain_id = guest.definition(), guest.checksums(), guest.domain.ID()
        url, sha = bed.serve("image B", "raw")

        result = await bed.rebuild(guest, url, sha)

        assert_refused_before_stop(result, guest, before, sums, domain_id, why)
    finally:
        if secret is not None:
            for made in bed.made:
                bed.conn.lookupByName(made.name).destroy()
            secret.undefine()


async def test_a_root_disk_behind_a_symlink_is_rebuilt_where_the_link_points(
    bed: Bed,
) -> None:
    """Disks on another file system, linked: the link stays a link, the file it names is the new disk."""
    elsewhere = bed.directory / "other-fs"
    elsewhere.mkdir()
    real = write_image(elsewhere / "root.img", "image A", size=4 << 20)
    link = bed.directory / "root.img"
    link.symlink_to(real)
    data = data_disk(bed.directory, "data.img")
    devices = disk_xml(link, "vda", extra="<boot order='1'/>") + disk_xml(data, "vdb")
    guest = bed.define(link, devices, files=(data,))
    before, sums = guest.definition(), guest.checksums(but=link)
    url, sha = bed.serve("image B", "raw")

    result = await bed.rebuild(guest, url, sha)

    assert result.code == 0, result.stderr
    console = guest.console()
    assert console.rindex("image B") > console.rindex("image A")
    assert link.is_symlink() and link.resolve() == real
    assert real.read_bytes()[:4] == b"QFI\xfb", "the file the link names is the new overlay"
    assert guest.checksums(but=link) == sums
    assert list(bed.directory.glob("root.img.rebuild-*")) == []
    assert list(elsewhere.glob("root.img.rebuild-*")) == []
    after = guest.definition()
    assert without_disk(after, "vda") == without_disk(before, "vda")
    assert_describes_new_disk(disk_of(after, "vda"), link, bed.cache / sha, "raw")


@pytest.mark.parametrize("busy", ["checkpoint", "block job"])
async def test_a_checkpointed_or_busy_root_disk_is_refused_before_the_stop(
    bed: Bed,
    busy: str,
) -> None:
    """A checkpoint's bitmap lives in the old disk; a block copy would be cut off by the stop."""
    root = write_image(bed.directory / "root.qcow2", "image A", fmt="qcow2", size=4 << 20)
    guest = bed.define(root, disk_xml(root, "vda", "qcow2", extra="<boot order='1'/>"))
    if busy == "checkpoint":
        guest.domain.checkpointCreateXML(
            "<domaincheckpoint><name>nightly</name><disks><disk name='vda' checkpoint='bitmap'/>"
            "</disks></domaincheckpoint>",
            0,
        )
        why = "checkpoints of its root disk vda (nightly)"
    else:
        copy = bed.directory / "copy.qcow2"
        guest.domain.blockCopy(
            "vda",
            f"<disk type='file'><driver type='qcow2'/><source file={quoteattr(str(copy))}/></disk>",
            {},
            libvirt.VIR_DOMAIN_BLOCK_COPY_TRANSIENT_JOB,
        )
        why = "block job on its root disk vda"
    before, sums, domain_id = guest.definition(), guest.checksums(), guest.domain.ID()
    url, sha = bed.serve("image B", "raw")
    try:
        result = await bed.rebuild(guest, url, sha)
        assert_refused_before_stop(result, guest, before, sums, domain_id, why)
    finally:
        if busy == "checkpoint":
            for checkpoint in guest.domain.listAllCheckpoints(0):
                checkpoint.delete(libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY)
        else:
            guest.domain.blockJobAbort("vda", 0)
