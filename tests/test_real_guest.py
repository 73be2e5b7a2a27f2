"""Rebuilds of a real Debian guest: a kernel, systemd, dbus and the QEMU guest agent, as operators run.

The images come from ``devtools.real_guest`` (built from Debian's packages on first use, then cached on
the machine). The guest has what real domains have: a ``pty`` serial console (mirrored into a log file
the test reads), a guest agent channel, two NICs and a data disk. Variant A and B print "real image A/B
reached multi-user" on the console and keep their name in ``/etc/rebuild-image``.

One guest serves the whole module, so it boots once for all tests: the rollback tests leave it on the
image it had; the last test rebuilds it to B.
"""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import libvirt
import libvirt_qemu
import pytest
from temporalio.testing import ActivityEnvironment

from activities.hypervisor import HypervisorActivities
from activities.libvirt_domain import Libvirt
from devtools import reachable
from devtools.guest import SECTOR
from devtools.image_server import ImageServer
from devtools.real_guest import RealGuestBuildError, RealGuestImages, ensure_images
from devtools.real_guest_domain import overlay, real_domain_xml
from devtools.temporal_dev import DevServer
from tests.e2e_support import DOMAIN_PREFIX, LIBVIRT_URI, Guest, WorkerProcess, rebuild_cli
from workflows.models import VerifyInstanceInput

# TCG boots it to multi-user in about 15 s on an idle 2-core host; a loaded one took 230 s.
BOOT_SECONDS = 600.0
pytestmark = pytest.mark.timeout(1800)
MARKER_A = RealGuestImages.marker("A")
MARKER_B = RealGuestImages.marker("B")
MULTI_USER = r"real image [A-Z] reached multi-user"


@pytest.fixture(scope="module")
def real_images() -> RealGuestImages:
    """Built here on first use (about two minutes), then from the machine's cache; never skipped."""
    try:
        images = ensure_images()
    except RealGuestBuildError as err:
        pytest.fail(f"the real guest image could not be built: {err}", pytrace=False)
    state = "built now" if images.built_now else "cached"
    print(f"real guest images {state} in {images.directory} (build took {images.build_seconds:.0f} s)")
    return images


@pytest.fixture(scope="module")
def real_dir(reachable_root: Path) -> Iterator[Path]:
    """Guest disks, console logs and the worker's image cache, where QEMU's own user can reach them."""
    path = reachable.make_dir("real-guest-", reachable_root)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def domain_type(libvirt_conn: Any, real_images: RealGuestImages, real_dir: Path) -> str:
    """KVM where the guest boots under it; TCG otherwise (nested KVM fails in extlinux's real mode)."""
    probe = _define(libvirt_conn, real_dir, real_images.a, "kvm", agent=False)
    try:
        try:
            probe.domain.create()
        except libvirt.libvirtError as err:
            print(f"guests run under TCG: KVM could not start a guest ({err.get_error_message()})")
            return "qemu"
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if "Linux version" in _read(probe.serial):
                print("guests run under KVM: the kernel started under it")
                return "kvm"
            state, _ = probe.domain.state()
            if state != libvirt.VIR_DOMAIN_RUNNING:
                break
            time.sleep(0.2)
        print("guests run under TCG: under KVM the guest did not reach its kernel (emulation failure)")
        return "qemu"
    finally:
        probe.remove()


@pytest.fixture(scope="module")
def real_worker(dev_server: DevServer, real_dir: Path) -> Iterator[WorkerProcess]:
    """A worker whose image cache QEMU can read (the overlay's backing file lives there)."""
    state = reachable.make_dir("worker-", real_dir)
    process = WorkerProcess(
        host=f"test-real-{uuid.uuid4().hex[:8]}",
        state_dir=state / "state",
        address=dev_server.address,
        log=state / "worker.log",
    )
    process.start()
    yield process
    process.stop()


@pytest.fixture(scope="module")
async def served(real_images: RealGuestImages, real_dir: Path) -> Any:
    directory = real_dir / "served"
    directory.mkdir()
    for variant in ("b", "panic"):
        (directory / f"{variant}.qcow2").symlink_to(getattr(real_images, variant))
    (directory / "halts.raw").write_bytes(_halting_boot_sector().ljust(4 << 20, b"\0"))
    server = ImageServer(directory)
    await server.start()
    yield server
    await server.stop()


@pytest.fixture(scope="module")
def real_guest(
    libvirt_conn: Any, real_images: RealGuestImages, real_dir: Path, domain_type: str
) -> Iterator[Guest]:
    """A running real guest on image A, booted to multi-user with its agent answering."""
    guest = _define(libvirt_conn, real_dir, real_images.a, domain_type, agent=True)
    try:
        began = time.monotonic()
        guest.domain.create()
        _wait_for_log(guest, MARKER_A, 0, BOOT_SECONDS)
        _wait_for_agent(guest, BOOT_SECONDS)
        print(f"real guest {guest.name} reached multi-user in {time.monotonic() - began:.1f} s")
        yield guest
    finally:
        guest.remove()


def _define(conn: Any, directory: Path, base: Path, domain_type: str, *, agent: bool) -> Guest:
    name = f"{DOMAIN_PREFIX}real-{uuid.uuid4().hex[:8]}"
    disk = overlay(base, directory / f"{name}.qcow2")
    data = directory / f"{name}-data.img"
    data.write_bytes(b"precious data" * 1000)
    log = directory / f"{name}.console.log"
    macs = ("52:54:00:bb:00:01", "52:54:00:bb:00:02")
    conn.defineXML(
        real_domain_xml(name, disk, log, data_disks=(data,), macs=macs, domain_type=domain_type, agent=agent)
    )
    return Guest(conn, name, disk, log, data, macs)


def _halting_boot_sector() -> bytes:
    """A disk that boots nothing: a valid boot sector (0x55AA) that halts without a word."""
    code = bytes.fromhex("faf4ebfd")  # cli; hlt; jmp hlt
    return code.ljust(SECTOR - 2, b"\0") + b"\x55\xaa"


def _read(path: Path) -> str:
    return path.read_bytes().decode(errors="replace") if path.exists() else ""


def _wait_for_log(guest: Guest, marker: str, after: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while marker not in _read(guest.serial)[after:]:
        if time.monotonic() > deadline:
            raise AssertionError(f"{guest.name} did not print {marker!r}: {_read(guest.serial)[-2000:]!r}")
        time.sleep(0.2)


def _agent(guest: Guest, command: dict[str, Any], timeout: int = 5) -> Any:
    answer = libvirt_qemu.qemuAgentCommand(guest.domain, json.dumps(command), timeout, 0)
    return json.loads(answer)["return"]


def _wait_for_agent(guest: Guest, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            _agent(guest, {"execute": "guest-ping"}, 2)
            return
        except libvirt.libvirtError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def _image_in_guest(guest: Guest) -> str:
    """Which image the running guest booted, read inside it through the agent's guest-exec."""
    pid = _agent(
        guest,
        {
            "execute": "guest-exec",
            "arguments": {"path": "/bin/cat", "arg": ["/etc/rebuild-image"], "capture-output": True},
        },
    )["pid"]
    for _ in range(100):
        status = _agent(guest, {"execute": "guest-exec-status", "arguments": {"pid": pid}})
        if status["exited"]:
            return base64.b64decode(status.get("out-data", "")).decode().strip()
        time.sleep(0.1)
    raise AssertionError("guest-exec did not finish")


async def _rebuild(worker: WorkerProcess, dev_server: DevServer, guest: Guest, url: str, *extra: str) -> Any:
    result = await rebuild_cli(
        dev_server.address,
        "start", guest.name, "--image", url, "--host", worker.host, "--stop-timeout", "120",
        "--wait", "--json", *extra,
        timeout=900,
    )  # fmt: skip
    return result


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as image:
        while chunk := image.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


async def test_image_that_never_reaches_multi_user_is_rolled_back(
    real_guest: Guest, real_worker: WorkerProcess, served: ImageServer, dev_server: DevServer
) -> None:
    """Its kernel panics (init=/bin/false): the console never shows multi-user, read via libvirt's stream."""
    before = _image_in_guest(real_guest)
    offset = len(_read(real_guest.serial))

    result = await _rebuild(
        real_worker, dev_server, real_guest, served.url("panic.qcow2"),
        "--verify", f"console:{MULTI_USER}", "--boot-timeout", "45",
    )  # fmt: skip

    assert result.code != 0, result.stdout
    outcome = result.json()
    assert outcome["outcome"] == "rolled-back", outcome
    assert outcome["failed_step"] == "verify"
    assert "printed no match" in outcome["error"]
    assert outcome["stopped_by"] in ("acpi", "agent")
    # The new image really booted (its kernel line); how far it got before the timeout depends on load.
    assert "init=/bin/false" in _read(real_guest.serial)[offset:]
    # The rollback started the old image: the same check, now through the pty stream, must pass.
    check = VerifyInstanceInput(
        instance=real_guest.name, verify=f"console:{MULTI_USER}", boot_timeout_seconds=BOOT_SECONDS
    )
    host = Libvirt(LIBVIRT_URI)
    try:
        verified = await ActivityEnvironment().run(HypervisorActivities(host).verify_instance, check)
    finally:
        host.close()
    assert verified is not None
    assert verified.detail == f"real image {before} reached multi-user"
    _wait_for_agent(real_guest, BOOT_SECONDS)
    assert _image_in_guest(real_guest) == before
    assert real_guest.leftovers() == []


async def test_image_that_boots_nothing_is_rolled_back_by_default(
    real_guest: Guest, real_worker: WorkerProcess, served: ImageServer, dev_server: DevServer
) -> None:
    """No --verify: the domain has a guest agent channel, so the agent must answer, and none does."""
    before = _image_in_guest(real_guest)
    offset = len(_read(real_guest.serial))

    result = await _rebuild(
        real_worker, dev_server, real_guest, served.url("halts.raw"), "--boot-timeout", "30"
    )

    assert result.code != 0, result.stdout
    outcome = result.json()
    assert outcome["outcome"] == "rolled-back", outcome
    assert outcome["failed_step"] == "verify"
    assert "guest agent" in outcome["error"]
    _wait_for_log(real_guest, f"real image {before} reached multi-user", offset, BOOT_SECONDS)
    _wait_for_agent(real_guest, BOOT_SECONDS)
    assert _image_in_guest(real_guest) == before


async def test_running_guest_is_stopped_gracefully_and_boots_the_new_image(
    real_guest: Guest,
    real_worker: WorkerProcess,
    served: ImageServer,
    dev_server: DevServer,
    real_images: RealGuestImages,
) -> None:
    before = real_guest.identity()
    data_before = real_guest.data_disk.read_bytes()
    offset = len(_read(real_guest.serial))
    sha = _sha256(real_images.b)

    result = await _rebuild(
        real_worker, dev_server, real_guest, served.url("b.qcow2"),
        "--sha256", sha, "--verify", "agent", "--boot-timeout", str(BOOT_SECONDS),
    )  # fmt: skip

    assert result.code == 0, result.stderr
    outcome = result.json()
    assert outcome["outcome"] == "rebuilt"
    assert outcome["stopped_by"] in ("acpi", "agent")
    assert outcome["forced_stop"] is False
    assert outcome["verified_by"] == "agent"
    print(f"rebuild A -> B: stopped by {outcome['stopped_by']}, steps {outcome['step_seconds']}")
    console = _read(real_guest.serial)[offset:]
    assert "reboot: Power down" in console  # the guest shut itself down
    _wait_for_log(real_guest, MARKER_B, offset, 60)
    assert _image_in_guest(real_guest) == "B"
    assert real_guest.identity() == before
    assert real_guest.data_disk.read_bytes() == data_before
    assert real_guest.leftovers() == []
