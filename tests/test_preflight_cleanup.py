"""Issue 24, finding 5: pre-flight's cleanup destroys only its own sandboxes.

``preflight_image`` removes a sandbox left by a crashed attempt before it creates its own, by name.
Scheduled directly on a host's queue with the rebuild ID ``prod``, it destroyed and undefined the
operator's persistent domain ``rebuild-preflight-prod``. Now only a transient domain that carries this
worker's owner mark (its ``<metadata>``) is destroyed, nothing is ever undefined, and the sizes are
bounded as prepare bounds them.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import libvirt

from activities.boot_check import BootCheck
from activities.domain_xml.sandbox import SANDBOX_NAMESPACE
from activities.preflight import PreflightActivities, sandbox_name
from activities.state import StateDir
from devtools.testbed.libvirt_test_driver import make_instance
from tests.test_hostile_inputs import attack  # noqa: F401 - the fixture

SHA = "ab" * 32
MIB = 1 << 20


def _like_vm1(conn: Any, name: str, metadata: str = "") -> str:
    xml = str(conn.lookupByName("vm-1").XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
    xml = xml.replace("<name>vm-1</name>", f"<name>{name}</name>")
    xml = xml.replace("11111111-2222-3333-4444-000000000000", str(uuid.uuid4()))
    return xml.replace("<memory", f"{metadata}<memory", 1)


def _preflight(rebuild_id: str, **sizes: int) -> dict[str, Any]:
    return {
        "instance": "vm-1",
        "rebuild_id": rebuild_id,
        "image_sha256": SHA,
        "image_format": "raw",
        "image_virtual_size": MIB,
        "boot_timeout_seconds": 1,
    } | sizes


async def test_a_persistent_domain_named_like_a_sandbox_survives_a_direct_preflight(attack: Any) -> None:  # noqa: F811
    conn = attack.vm.libvirt.connection()
    prod = sandbox_name("prod")
    assert prod == "rebuild-preflight-prod"
    conn.defineXML(_like_vm1(conn, prod))
    conn.lookupByName(prod).create()

    answer = await attack("preflight_image", _preflight("prod"))

    assert answer.startswith(
        f"PreflightFailed: a domain named {prod!r} exists and is not a pre-flight sandbox"
    )
    domain = conn.lookupByName(prod)
    assert domain.isPersistent() and domain.isActive()


async def test_a_transient_domain_without_the_owner_mark_survives_too(attack: Any) -> None:  # noqa: F811
    conn = attack.vm.libvirt.connection()
    other = sandbox_name("other")
    # Even one that says it is a sandbox in its description: the mark is this worker's metadata.
    conn.createXML(_like_vm1(conn, other, "<description>durable-rebuild pre-flight sandbox</description>"), 0)
    answer = await attack("preflight_image", _preflight("other"))
    assert answer.startswith("PreflightFailed: a domain named"), answer
    assert conn.lookupByName(other).isActive()


async def test_preflight_bounds_the_sandbox_disk_as_prepare_does(attack: Any) -> None:  # noqa: F811
    for sizes in ({"image_virtual_size": 1 << 60}, {"min_virtual_size": 1 << 60}, {"image_virtual_size": -1}):
        answer = await attack("preflight_image", _preflight("huge", **sizes))
        assert answer.startswith("ImageTooLarge: "), answer


def test_the_sweep_destroys_only_transient_sandboxes_with_its_mark(tmp_path: Path) -> None:
    vm = make_instance(tmp_path)
    state = StateDir(tmp_path / "state")
    state.create()
    preflight = PreflightActivities(vm.libvirt, state, BootCheck(vm.libvirt))
    preflight.directory.mkdir()
    conn = vm.libvirt.connection()
    mark = (
        f"<metadata><sandbox:owner xmlns:sandbox='{SANDBOX_NAMESPACE}'>"
        f"durable-rebuild pre-flight sandbox of {state.root}, removed after its check"
        "</sandbox:owner></metadata>"
    )
    conn.createXML(_like_vm1(conn, sandbox_name("crashed"), mark), 0)
    conn.defineXML(_like_vm1(conn, sandbox_name("persistent"), mark))
    conn.createXML(_like_vm1(conn, sandbox_name("unmarked")), 0)

    assert preflight.sweep() == [sandbox_name("crashed")]

    names = vm.libvirt.domain_names()
    assert sandbox_name("crashed") not in names
    assert {sandbox_name("persistent"), sandbox_name("unmarked")} <= set(names)
