"""Snapshot records and the snapshot activities' own checks, on the test driver (no guest needed).

Records are read back only when they are ours and whole; an ID is 32 hex digits and nothing else; an
image stays while another record or an instance's disk needs it; bad input is refused before libvirt
or the file system is touched.
"""

from __future__ import annotations

import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from temporalio.testing import ActivityEnvironment

from activities.errors import HostOutOfSpace, InvalidRequest, SnapshotNotFound
from activities.snapshot_store import SnapshotStore
from activities.snapshots import SnapshotActivities
from activities.state import StateDir
from devtools.testbed.libvirt_test_driver import make_instances
from tests.test_cache import cache
from workflows.snapshot_models import SnapshotCatalogRequest, SnapshotRecord, TakeSnapshotInput


def record(state: StateDir, sha256: str, instance: str = "web-1", age_days: float = 0) -> SnapshotRecord:
    made = SnapshotRecord(
        snapshot_id=f"{abs(hash((sha256, instance, age_days))):032x}"[-32:],
        instance=instance,
        instance_uuid="00000000-0000-0000-0000-000000000001",
        host="kvm-1",
        taken_at=datetime.now(UTC) - timedelta(days=age_days),
        sha256=sha256,
        format="qcow2",
        size=1,
        virtual_size=1,
        consistency="shut-off",
        root_disk_target="vda",
    )
    SnapshotStore(state).save(made)
    return made


def test_records_are_read_only_when_whole_ours_and_their_image_exists(tmp_path: Path) -> None:
    state = StateDir(tmp_path / "state")
    kept = record(state, cache(state, "kept", 0))
    store = SnapshotStore(state)
    # A record someone wrote by hand, one that names another ID inside, one whose image is gone.
    (state.snapshots / f"{'1' * 32}.json").write_text("{not json")
    renamed = kept.model_copy(update={"snapshot_id": "2" * 32})
    (state.snapshots / f"{'3' * 32}.json").write_text(renamed.model_dump_json())
    orphan = record(state, "4" * 64)

    assert [r.snapshot_id for r in store.all()] == [kept.snapshot_id]
    assert store.find(orphan.snapshot_id) is None
    with pytest.raises(SnapshotNotFound):
        store.get("3" * 32)


@pytest.mark.parametrize("bad", ["../../etc/passwd", "A" * 32, "a" * 31, "a" * 33, "", "a" * 31 + "/"])
def test_a_snapshot_id_is_32_lowercase_hex_digits(tmp_path: Path, bad: str) -> None:
    state = StateDir(tmp_path / "state")
    with pytest.raises(InvalidRequest, match="snapshot ID"):
        state.snapshot_record(bad)
    with pytest.raises(InvalidRequest, match="snapshot ID"):
        state.snapshot_partial(bad)


def test_an_image_stays_while_another_record_or_a_disk_needs_it(tmp_path: Path) -> None:
    state = StateDir(tmp_path / "state")
    shared, used, alone = (cache(state, marker, 0) for marker in ("shared", "used", "alone"))
    first, second = record(state, shared, "web-1"), record(state, shared, "web-2")
    by_disk, lonely = record(state, used), record(state, alone, "db-1")
    store = SnapshotStore(state)

    assert store.delete(first.snapshot_id, images_in_use=set())
    assert store.delete(by_disk.snapshot_id, images_in_use={used})
    assert store.delete(lonely.snapshot_id, images_in_use=set())
    assert not store.delete(lonely.snapshot_id, images_in_use=set())

    assert state.image_path(shared).exists(), "the second record still names it"
    assert state.image_path(used).exists(), "an instance's disk is backed by it"
    assert not state.image_path(alone).exists()
    assert [r.snapshot_id for r in store.all()] == [second.snapshot_id]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"snapshot_id": "../x"}, "snapshot ID"),
        ({"instance": "../../vm"}, "instance name"),
        ({"quiesce": "sometimes"}, "quiesce"),
        ({"label": "a\nb"}, "label"),
    ],
)
async def test_take_snapshot_checks_its_own_input(
    tmp_path: Path, change: dict[str, str], message: str
) -> None:
    (vm,) = make_instances(tmp_path, ["web-1"])
    state = StateDir(tmp_path / "state")
    state.create()
    activities = SnapshotActivities(vm.libvirt, state, "kvm-1")
    request = TakeSnapshotInput(snapshot_id="a" * 32, instance="web-1", host="kvm-1").model_copy(
        update=change
    )

    with pytest.raises(InvalidRequest, match=message):
        await ActivityEnvironment().run(activities.take_snapshot, request)
    assert list(state.snapshots.glob("*")) == [state.snapshots / "partial"]
    assert list((state.snapshots / "partial").iterdir()) == []


async def test_delete_refuses_an_unknown_id_before_deleting_any(tmp_path: Path) -> None:
    (vm,) = make_instances(tmp_path, ["web-1"])
    state = StateDir(tmp_path / "state")
    known = record(state, cache(state, "known", 0))
    activities = SnapshotActivities(vm.libvirt, state, "kvm-1")
    request = SnapshotCatalogRequest(
        host="kvm-1", action="delete", snapshot_ids=(known.snapshot_id, "0" * 32)
    )

    with pytest.raises(SnapshotNotFound, match="0" * 32):
        await ActivityEnvironment().run(activities.snapshot_catalog, request)
    assert SnapshotStore(state).find(known.snapshot_id) is not None


async def test_a_shut_off_instance_on_the_test_driver_is_copied_whole(tmp_path: Path) -> None:
    """The shut-off path is qemu-img alone: the test driver's instance disk is a real file."""
    (vm,) = make_instances(tmp_path, ["web-1"], running=False)
    state = StateDir(tmp_path / "state")
    state.create()
    activities = SnapshotActivities(vm.libvirt, state, "kvm-1")
    made = await ActivityEnvironment().run(
        activities.take_snapshot, TakeSnapshotInput(snapshot_id="b" * 32, instance="web-1", host="kvm-1")
    )
    assert made.consistency == "shut-off"
    copied = subprocess.run(
        ["qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(vm.disk), str(state.image_path(made.sha256))],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert copied.returncode == 0, copied.stdout + copied.stderr


async def test_a_state_directory_without_the_room_is_refused_before_the_copy(tmp_path: Path) -> None:
    """A real small file system (tmpfs of 2 MiB) under the state directory: nothing is written to it."""
    (vm,) = make_instances(tmp_path, ["web-1"], running=False, disk_size=8 << 20)
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(small)], check=True)
    try:
        state = StateDir(small / "state")
        state.create()
        activities = SnapshotActivities(vm.libvirt, state, "kvm-1")
        request = TakeSnapshotInput(snapshot_id="d" * 32, instance="web-1", host="kvm-1")
        with pytest.raises(HostOutOfSpace, match="needs up to"):
            await ActivityEnvironment().run(activities.take_snapshot, request)
        assert list((state.snapshots / "partial").iterdir()) == []
        assert [p for p in state.images.iterdir() if p.is_file()] == []
    finally:
        subprocess.run(["umount", str(small)], check=True)
