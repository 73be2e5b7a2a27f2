"""Root disks that are Ceph RBD images, on a real single-node Ceph cluster and a real libvirtd.

The guest's root disk is ``<disk type='network'><source protocol='rbd'>`` on the test cluster (the
``ceph`` fixture), reached by QEMU over TCP with a cephx key from a libvirt secret. It is rebuilt (the
console proves image B booted, the live definition names the clone, the old image is kept until
cleanup and gone after), rolled back by an image that does not boot (image A boots again from the old
image), rebuilt again with the same image (the base is imported once), resumed after a worker is
killed at each kill point, and refused before the stop when the secret its disk names is gone.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
import xml.etree.ElementTree as ET

import pytest
from temporalio.client import Client

from activities.ceph_rbd import rbd_source
from activities.errors import UnsupportedInstance
from activities.rbd_cache import base_name
from devtools.testbed.ceph import CephCluster, rbd_guest, rbd_image_of
from devtools.testbed.e2e import rebuild_cli, wait_for_file
from devtools.testbed.shapes import Bed, Shaped, assert_refused_before_stop

# One process runs them all under pytest-xdist, on the one cluster its session starts.
pytestmark = pytest.mark.xdist_group("ceph")


def live_image(guest: Shaped) -> str:
    """The RBD image QEMU has open: the running domain's definition, not the persistent one."""
    return rbd_image_of(str(guest.domain.XMLDesc(0)))


def clones_of(guest: Shaped, ceph: CephCluster) -> set[str]:
    """The images a rebuild of this guest cloned (named from the instance and the rebuild)."""
    return {n for n in ceph.images() if n.startswith(f"{guest.name}-root-")}


def base_record(bed: Bed, cluster: CephCluster, sha: str) -> dict[str, object]:
    record = bed.worker.state_dir / "pool-images" / f"rbd-{cluster.pool}" / sha
    found: dict[str, object] = json.loads(record.read_text())
    return found


async def test_an_rbd_root_is_rebuilt_rolled_back_and_rebuilt_again_on_one_base(
    bed: Bed, ceph: CephCluster
) -> None:
    guest = rbd_guest(bed, ceph)
    old = rbd_image_of(guest.definition())
    before = guest.definition()

    # Images of their own: the pool (one per session) may hold other tests' bases of "image B".
    tag = uuid.uuid4().hex[:6]
    bad_url, bad_sha = bed.serve(f"image C {tag}", "raw")
    planned = await bed.rebuild(guest, bad_url, bad_sha, "--dry-run", "--json")
    assert planned.code == 0, planned.stderr
    assert "rbd: an import of the image, then a clone of it" in planned.stdout, planned.stdout
    assert guest.definition() == before and clones_of(guest, ceph) == set()
    assert base_name(bad_sha) not in ceph.images(), "a dry run imports nothing"
    rolled_back = await bed.rebuild(guest, bad_url, bad_sha)
    assert rolled_back.code == 1, rolled_back.stderr
    assert "rolled back" in rolled_back.stderr, rolled_back.stderr
    guest.wait_for_console("image A", after=guest.console().index("image C"))
    assert guest.definition() == before
    assert live_image(guest) == old
    assert clones_of(guest, ceph) == set(), "the clone of image C went with the rollback"
    assert {old.split("/")[1], base_name(bad_sha)} <= ceph.images()

    url, sha = bed.serve(f"image B {tag}", "raw")
    # Paused before cleanup: the old image is still there while the instance runs on the clone.
    pause = bed.worker.pause_dir
    assert pause is not None
    (pause / "cleanup.before-remove").touch()
    began = time.monotonic()
    rebuilding = bed.rebuild(guest, url, sha, "--json")
    task = asyncio.create_task(rebuilding)
    await wait_for_file(pause / "cleanup.before-remove.reached")
    new = live_image(guest)
    assert new != old
    assert old.split("/")[1] in ceph.images(), "the old image is kept until cleanup"
    (pause / "cleanup.before-remove").unlink()
    rebuilt = await task
    took = time.monotonic() - began
    assert rebuilt.code == 0, rebuilt.stderr
    console = guest.console()
    assert console.rindex("image B") > console.rindex("image A")
    assert rbd_image_of(guest.definition()) == new
    assert old.split("/")[1] not in ceph.images(), "the old image went at cleanup"
    result = rebuilt.json()
    assert "rbd" in str(result["disk_mode"]) and "imported in" in str(result["disk_mode"])
    info = json.loads(ceph.rbd("info", "--format", "json", new))
    assert info["parent"]["image"] == base_name(sha), "the new root is a clone of the base"
    base_id = json.loads(ceph.rbd("info", "--format", "json", f"{ceph.pool}/{base_name(sha)}"))["id"]
    print(f"\nrbd rebuild: {took:.1f} s, steps {result['step_seconds']}, mode {result['disk_mode']}")

    again = await bed.rebuild(guest, url, sha, "--json")
    assert again.code == 0, again.stderr
    assert "imported before" in str(again.json()["disk_mode"])
    assert base_record(bed, ceph, sha)["imports"] == 1, "one import for two rebuilds with one image"
    assert json.loads(ceph.rbd("info", "--format", "json", f"{ceph.pool}/{base_name(sha)}"))["id"] == base_id
    assert live_image(guest) not in (old, new)
    assert new.split("/")[1] not in ceph.images()
    await the_bases_are_counted_and_kept_while_a_clone_needs_them(bed, ceph, guest, sha, bad_sha)


async def the_bases_are_counted_and_kept_while_a_clone_needs_them(
    bed: Bed, ceph: CephCluster, guest: Shaped, sha: str, unused_sha: str
) -> None:
    """`rebuild cache list` shows the pool's bases with the domains whose clones hang from them;
    `rebuild cache prune` removes the base nothing is cloned from, never the one the guest runs on."""
    common = ["--state-dir", str(bed.worker.state_dir), "--libvirt-uri", "qemu:///system", "--json"]
    listed = await rebuild_cli(bed.server.address, "cache", "list", *common)
    assert listed.code == 0, listed.stderr
    bases = {e["sha256"]: e["users"] for e in json.loads(listed.stdout) if e["where"] == f"rbd {ceph.pool}"}
    assert bases == {sha: [guest.name], unused_sha: []}
    pruned = await rebuild_cli(bed.server.address, "cache", "prune", "--max-age-days", "0", *common)
    assert pruned.code == 0, pruned.stderr
    assert base_name(unused_sha) not in ceph.images()
    assert base_name(sha) in ceph.images()
    assert live_image(guest).split("/")[1] in ceph.images()


@pytest.mark.parametrize("point", ["stage.after-write", "prepare.after-new-disk", "cleanup.before-remove"])
async def test_a_worker_killed_at_each_kill_point_leaves_an_rbd_rebuild_that_finishes(
    bed: Bed, ceph: CephCluster, client: Client, point: str
) -> None:
    guest = rbd_guest(bed, ceph)
    old = rbd_image_of(guest.definition())
    result = await bed.rebuild_killed_at(client, guest, point)

    assert result["outcome"] == "rebuilt"
    guest.wait_for_console("image B")
    new = live_image(guest)
    assert new != old
    assert old.split("/")[1] not in ceph.images()
    assert new.split("/")[1] in ceph.images()


async def test_a_worker_killed_while_it_puts_the_old_rbd_image_back_finishes_the_rollback(
    bed: Bed, ceph: CephCluster
) -> None:
    """Aborted after the swap, the worker killed at restore's kill point: the next worker points the
    disk back at the old image, the clone goes, and image A boots again."""
    guest = rbd_guest(bed, ceph)
    old, before = rbd_image_of(guest.definition()), guest.definition()
    pause = bed.worker.pause_dir
    assert pause is not None
    for point in ("prepare.after-new-disk", "restore.before-swap"):
        (pause / point).touch()
    url, sha = bed.serve("image B", "raw")
    rebuilding = asyncio.create_task(bed.rebuild(guest, url, sha))
    await wait_for_file(pause / "prepare.after-new-disk.reached")
    aborted = await rebuild_cli(
        bed.server.address, "abort", guest.name, "--host", bed.worker.host, "--reason", "test"
    )
    assert aborted.code == 0, aborted.stderr
    (pause / "prepare.after-new-disk").unlink()
    await wait_for_file(pause / "restore.before-swap.reached")
    assert rbd_image_of(guest.definition()) != old, "killed with the clone still swapped in"
    bed.worker.kill()
    (pause / "restore.before-swap").unlink()
    bed.worker.start()

    result = await rebuilding
    assert result.code == 1, result.stderr
    assert "rolled back" in result.stderr, result.stderr
    guest.wait_for_console("image A", after=guest.console().index("image A") + 1)
    assert guest.definition() == before
    assert live_image(guest) == old
    assert ceph.images() >= {old.split("/")[1]}
    assert clones_of(guest, ceph) == set(), "the clone went with the rollback"


async def test_an_rbd_root_whose_secret_is_gone_is_refused_before_the_stop(
    bed: Bed, ceph: CephCluster
) -> None:
    guest = rbd_guest(bed, ceph)
    definition = guest.definition().replace(ceph.secret_uuid, "00000000-0000-4000-8000-000000000022")
    guest.conn.defineXML(definition)
    before, sums, domain_id = guest.definition(), guest.checksums(), guest.domain.ID()
    url, sha = bed.serve("image B", "raw")

    result = await bed.rebuild(guest, url, sha)

    assert_refused_before_stop(result, guest, before, sums, domain_id, "does not exist (virsh secret-list)")
    assert "00000000-0000-4000-8000-000000000022" in result.stderr


RBD_DISK = (
    "<disk type='network' device='disk'><driver name='qemu' type='raw'/>{auth}"
    "<source protocol='rbd' name='{name}'>{hosts}</source><target dev='vda'/></disk>"
)
AUTH = "<auth username='rebuild'><secret type='ceph' uuid='00000000-0000-4000-8000-000000000001'/></auth>"
HOSTS = "<host name='10.0.0.1' port='6789'/><host name='10.0.0.2'/>"


@pytest.mark.parametrize(
    ("auth", "name", "hosts", "why"),
    [
        ("", "rbd/root", HOSTS, "no cephx <auth"),
        (AUTH, "rbd/ns/root", HOSTS, "is not POOL/IMAGE"),
        (AUTH, "rbd/root@snap", HOSTS, "is not POOL/IMAGE"),
        (AUTH, "rbd/root", "<config file='/etc/ceph/ceph.conf'/>", "names no monitor"),
    ],
)
def test_an_rbd_disk_the_back_end_cannot_reach_as_qemu_does_is_refused(
    auth: str, name: str, hosts: str, why: str
) -> None:
    disk = ET.fromstring(RBD_DISK.format(auth=auth, name=name, hosts=hosts))
    with pytest.raises(UnsupportedInstance, match=re.escape(why)):
        rbd_source(disk, "instance 'x': root disk vda")


def test_an_rbd_disk_names_its_monitors_user_and_secret() -> None:
    source = rbd_source(ET.fromstring(RBD_DISK.format(auth=AUTH, name="rbd/root", hosts=HOSTS)), "vda")
    assert (source.pool, source.image, source.user) == ("rbd", "root", "rebuild")
    assert source.hosts == ("10.0.0.1:6789", "10.0.0.2")
    assert source.secret_uuid == "00000000-0000-4000-8000-000000000001"
