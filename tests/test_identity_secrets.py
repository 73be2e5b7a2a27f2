"""Issue 24, finding 4: an identity's secrets are not written where any local user reads them.

The domain's ``<metadata>`` is readable through libvirt's read-only socket (``virsh -r dumpxml``): it
held the whole identity, user data and password hash included. Seeds were written 0644 whatever the
umask. Now the metadata holds the public part, a digest of the user data and the digest that names
the secrets' root-only file in the state directory; seeds are 0600 from their first byte.
"""

from __future__ import annotations

import hashlib
import os
import stat
import xml.etree.ElementTree as ET
from pathlib import Path

import libvirt
import pytest
from temporalio.testing import ActivityEnvironment

from activities.identity_store import IdentityStore
from activities.seed import SeedActivities
from activities.seed_image import build_seed, read_seed
from activities.state import StateDir
from devtools.testbed.libvirt_test_driver import DriverInstance, make_instance
from workflows.identity import GuestIdentity, IdentityChange
from workflows.models import PrepareSeedInput, RemoveSeedBackupInput, RestoreSeedInput

env = ActivityEnvironment()
SCRIPT = "#!/bin/sh\necho the db password is hunter2 > /root/marker\n"
HASH = "$6$saltsalt$" + "a" * 86


def _read_only_dump(vm: DriverInstance) -> str:
    """What ``virsh -r dumpxml --inactive`` shows any local user (no VIR_DOMAIN_XML_SECURE): the
    definition the next boot uses, where a rebuild records the identity."""
    return str(vm.libvirt.connection().lookupByName(vm.name).XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))


@pytest.fixture
def seeded(tmp_path: Path) -> tuple[DriverInstance, StateDir, SeedActivities]:
    vm = make_instance(tmp_path)
    state = StateDir(tmp_path / "state")
    state.create()
    return vm, state, SeedActivities(vm.libvirt, state)


async def test_no_secret_is_in_the_domain_definition_and_the_secrets_file_is_root_only(
    seeded: tuple[DriverInstance, StateDir, SeedActivities],
) -> None:
    vm, state, seeds = seeded
    change = IdentityChange(hostname="web-1", user_data=SCRIPT, admin_password_hash=HASH)
    await env.run(seeds.prepare_seed, PrepareSeedInput(instance="vm-1", rebuild_id="r1", change=change))

    dump = _read_only_dump(vm)
    assert "hunter2" not in dump and HASH not in dump and "aaaaaaaa" not in dump
    assert "web-1" in dump
    assert hashlib.sha256(SCRIPT.encode()).hexdigest() in dump  # the user data's digest, to compare
    files = list((state.root / "secrets").iterdir())
    assert len(files) == 1 and "hunter2" in files[0].read_text()
    assert stat.S_IMODE(files[0].stat().st_mode) == 0o600
    assert stat.S_IMODE(files[0].parent.stat().st_mode) == 0o700
    xml = ET.fromstring(dump)
    assert IdentityStore(state).load(xml) == GuestIdentity(
        hostname="web-1", user_data=SCRIPT, admin_password_hash=HASH
    )


async def test_the_secrets_survive_a_rebuild_that_keeps_them_and_a_rollback_puts_the_old_back(
    seeded: tuple[DriverInstance, StateDir, SeedActivities],
) -> None:
    vm, state, seeds = seeded
    first = IdentityChange(hostname="web-1", user_data=SCRIPT)
    await env.run(seeds.prepare_seed, PrepareSeedInput(instance="vm-1", rebuild_id="r1", change=first))
    await env.run(seeds.remove_seed_backup, RemoveSeedBackupInput(instance="vm-1", rebuild_id="r1"))

    # A rebuild without identity options keeps the user data, read back from the secrets file.
    kept = await env.run(seeds.prepare_seed, PrepareSeedInput(instance="vm-1", rebuild_id="r2"))
    _, files = read_seed(Path(kept.seed_path))
    assert b"echo the db password is hunter2" in files["user-data"]
    await env.run(seeds.remove_seed_backup, RemoveSeedBackupInput(instance="vm-1", rebuild_id="r2"))
    assert len(list((state.root / "secrets").iterdir())) == 1

    # A new password, then a rollback: the old secrets are back, the new ones gone.
    change = IdentityChange(admin_password_hash=HASH)
    await env.run(seeds.prepare_seed, PrepareSeedInput(instance="vm-1", rebuild_id="r3", change=change))
    assert len(list((state.root / "secrets").iterdir())) == 2
    await env.run(seeds.restore_seed, RestoreSeedInput(instance="vm-1", rebuild_id="r3"))
    assert len(list((state.root / "secrets").iterdir())) == 1
    xml = ET.fromstring(_read_only_dump(vm))
    assert IdentityStore(state).load(xml) == GuestIdentity(hostname="web-1", user_data=SCRIPT)


def test_seeds_are_written_0600_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o000)
    try:
        seed = tmp_path / "seed.iso"
        build_seed(GuestIdentity(user_data=SCRIPT), "iid-1", seed)
    finally:
        os.umask(old)
    assert stat.S_IMODE(seed.stat().st_mode) == 0o600
    assert b"echo the db password is hunter2" in read_seed(seed)[1]["user-data"]
