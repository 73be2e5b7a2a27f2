"""Issue 24, finding 10: verify is no oracle over any instance's console, and never kicks off an operator.

Anyone who reaches Temporal could schedule ``verify_instance`` on a host's queue and learn whether any
instance's serial log matches a pattern of theirs (a console that shows a password prompt, a key's
fingerprint, a secret a service printed). Now verify checks only the boot that a rebuild's own
``start_instance`` recorded on the host: that domain (its UUID), that run of it (libvirt's ID), that
boot's console output. A ``pty`` console is opened without FORCE: an operator's ``virsh console`` is
left alone and the check says who holds it.
"""

from __future__ import annotations

import contextlib
import stat
import uuid
from pathlib import Path
from typing import Any

import libvirt
import pytest
from temporalio.testing import ActivityEnvironment

from activities.errors import ConsoleBusy
from activities.hypervisor import HypervisorActivities
from activities.libvirt_domain import Libvirt
from activities.state import StateDir
from devtools.guest import domain_xml, remove_domain, write_image
from devtools.testbed.e2e import DOMAIN_PREFIX, DOMAIN_TYPE, LIBVIRT_URI
from tests.test_hostile_inputs import attack  # noqa: F401 - the fixture
from workflows.models import StartInstanceInput, VerifyInstanceInput

SECRET = b"root password for the db: hunter2\r\n"


def _verify(rebuild_id: str | None, pattern: str = "hunter[0-9]") -> dict[str, Any]:
    request: dict[str, Any] = {
        "instance": "vm-1",
        "verify": f"console:{pattern}",
        "boot_timeout_seconds": 0.5,
    }
    if rebuild_id is not None:
        request["rebuild_id"] = rebuild_id
    return request


async def test_verify_without_a_start_record_is_refused_whatever_the_console_says(attack: Any) -> None:  # noqa: F811
    assert await attack("start_instance", {"instance": "vm-1"}) == "accepted"  # a start of no rebuild
    attack.vm.serial.write_bytes(SECRET)
    for rebuild_id, why in (
        (None, "a rebuild_id is required"),
        ("made-up-rebuild", "did not start instance 'vm-1'"),
        ("../../started/x", "not a rebuild ID"),
        ("a/b", "not a rebuild ID"),
    ):
        answer = await attack("verify_instance", _verify(rebuild_id))
        assert answer.startswith("InvalidRequest: "), answer
        assert why in answer


async def test_a_start_of_a_running_instance_records_nothing(attack: Any) -> None:  # noqa: F811
    assert await attack("start_instance", {"instance": "vm-1", "rebuild_id": "legit-rebuild"}) == "accepted"
    attack.vm.serial.write_bytes(SECRET)  # printed after the rebuild's boot began
    # The attacker "starts" the instance the rebuild runs, under a rebuild ID of its own.
    assert await attack("start_instance", {"instance": "vm-1", "rebuild_id": "attackers-own"}) == "accepted"
    answer = await attack("verify_instance", _verify("attackers-own"))
    assert answer.startswith("InvalidRequest: rebuild 'attackers-own' did not start instance 'vm-1'")
    assert not attack.state.start_record("attackers-own").exists()
    # The rebuild's own check still works, on its own boot.
    assert await attack("verify_instance", _verify("legit-rebuild")) == "accepted"
    record = attack.state.start_record("legit-rebuild")
    assert stat.S_IMODE(record.stat().st_mode) == 0o600
    assert stat.S_IMODE(record.parent.stat().st_mode) == 0o700


async def test_verify_reads_only_the_boot_its_rebuild_started(attack: Any) -> None:  # noqa: F811
    attack.vm.serial.write_bytes(SECRET)  # an earlier boot's output: never this rebuild's to read
    assert await attack("start_instance", {"instance": "vm-1", "rebuild_id": "legit-rebuild"}) == "accepted"
    # Whatever offset the caller claims, the record's is used.
    answer = await attack("verify_instance", _verify("legit-rebuild") | {"console_offset": 0})
    assert answer.startswith("BootCheckFailed: instance 'vm-1' did not print"), answer
    # Restarted since (by an operator, or anyone): that boot is no longer the rebuild's.
    assert await attack("stop_instance", {"instance": "vm-1", "timeout_seconds": 0}) == "accepted"
    assert await attack("start_instance", {"instance": "vm-1"}) == "accepted"
    answer = await attack("verify_instance", _verify("legit-rebuild", "."))
    assert answer.startswith("BootCheckFailed: instance 'vm-1' was started again"), answer


async def test_a_record_names_its_domain_by_uuid(attack: Any) -> None:  # noqa: F811
    assert await attack("start_instance", {"instance": "vm-1", "rebuild_id": "legit-rebuild"}) == "accepted"
    conn = attack.vm.libvirt.connection()
    domain = conn.lookupByName("vm-1")
    xml = domain.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    domain.destroy()
    domain.undefine()
    old_uuid = "11111111-2222-3333-4444-000000000000"
    conn.defineXML(xml.replace(old_uuid, str(uuid.uuid4())))  # another domain under the same name
    conn.lookupByName("vm-1").create()
    answer = await attack("verify_instance", _verify("legit-rebuild", "."))
    assert answer.startswith("InvalidRequest: instance 'vm-1' is another domain"), answer


async def test_a_pty_console_an_operator_holds_is_never_forced_away(
    libvirt_conn: Any, guest_dir: Path, tmp_path: Path
) -> None:
    name = f"{DOMAIN_PREFIX}pty-{uuid.uuid4().hex[:6]}"
    disk = write_image(guest_dir / f"{name}.img", "image A", size=4 << 20)
    xml = domain_xml(name, disk, guest_dir / "unused.log", domain_type=DOMAIN_TYPE)
    start, end = xml.index("<serial type='file'>"), xml.index("</serial>") + len("</serial>")
    libvirt_conn.defineXML(xml[:start] + "<serial type='pty'><target port='0'/></serial>" + xml[end:])
    host = Libvirt(LIBVIRT_URI)
    state = StateDir(tmp_path / "state")
    state.create()
    hypervisor = HypervisorActivities(host, state=state)
    env = ActivityEnvironment()
    operator = libvirt_conn.newStream(0)
    try:
        await env.run(hypervisor.start_instance, StartInstanceInput(instance=name, rebuild_id="pty-rebuild"))
        libvirt_conn.lookupByName(name).openConsole(None, operator, 0)  # the operator's virsh console
        check = VerifyInstanceInput(
            instance=name, verify="console:image A", boot_timeout_seconds=2, rebuild_id="pty-rebuild"
        )
        with pytest.raises(ConsoleBusy, match="held by another client") as busy:
            await env.run(hypervisor.verify_instance, check)
        assert busy.value.non_retryable
        # The operator's session is still theirs: libvirt would have aborted it under FORCE.
        assert libvirt_conn.lookupByName(name).isActive()
        with pytest.raises(libvirt.libvirtError, match="Active console session"):
            libvirt_conn.lookupByName(name).openConsole(None, libvirt_conn.newStream(0), 0)
    finally:
        with contextlib.suppress(libvirt.libvirtError):
            operator.abort()
        host.close()
        remove_domain(libvirt_conn, name)
