"""One real Debian guest, booted once for all the package's tests that one process runs (a TCG boot
takes a minute or more; under pytest-xdist they share two workers, see ``SHARED_GUEST``).

The images come from ``devtools.real_guest`` (built from Debian's packages on first use, then cached on
the machine). Each test starts from whatever image the guest runs and says which one it needs; a test
that fails leaves the guest on its old image or its new one, both of which boot.
"""

from __future__ import annotations

import shutil
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import libvirt
import pytest

from devtools import reachable
from devtools.image_server import ImageServer
from devtools.real_guest import RealGuestBuildError, RealGuestImages, ensure_images
from devtools.temporal_dev import DevServer
from devtools.testbed.e2e import Guest, WorkerProcess
from devtools.testbed.real_guest import (
    BOOT_SECONDS,
    define,
    halting_boot_sector,
    read,
    wait_for_agent,
)


@pytest.fixture(scope="package")
def real_images() -> RealGuestImages:
    """Built here on first use (about two minutes), then from the machine's cache; never skipped."""
    try:
        images = ensure_images()
    except RealGuestBuildError as err:
        pytest.fail(f"the real guest image could not be built: {err}", pytrace=False)
    state = "built now" if images.built_now else "cached"
    print(f"real guest images {state} in {images.directory} (build took {images.build_seconds:.0f} s)")
    return images


@pytest.fixture(scope="package")
def real_dir(reachable_root: Path) -> Iterator[Path]:
    """Guest disks, console logs and the worker's image cache, where QEMU's own user can reach them."""
    path = reachable.make_dir("real-guest-", reachable_root)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="package")
def domain_type(libvirt_conn: Any, real_images: RealGuestImages, real_dir: Path) -> str:
    """KVM where the guest boots under it; TCG otherwise (nested KVM fails in extlinux's real mode)."""
    probe = define(libvirt_conn, real_dir, real_images.a, "kvm", agent=False)
    try:
        try:
            probe.domain.create()
        except libvirt.libvirtError as err:
            print(f"guests run under TCG: KVM could not start a guest ({err.get_error_message()})")
            return "qemu"
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if "Linux version" in read(probe.serial):
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


@pytest.fixture(scope="package")
def real_worker(dev_server: DevServer, real_dir: Path) -> Iterator[WorkerProcess]:
    """A worker whose image cache QEMU can read (the overlay's backing file lives there)."""
    state = reachable.make_dir("worker-", real_dir)
    pause_dir = state / "pause"
    pause_dir.mkdir()
    process = WorkerProcess(
        host=f"test-real-{uuid.uuid4().hex[:8]}",
        state_dir=state / "state",
        address=dev_server.address,
        log=state / "worker.log",
        pause_dir=pause_dir,
    )
    process.start()
    yield process
    process.stop()


@pytest.fixture(scope="package")
async def served(real_images: RealGuestImages, real_dir: Path) -> AsyncIterator[ImageServer]:
    """The real images, a disk that boots nothing and one that holds nothing, over HTTP."""
    directory = real_dir / "served"
    directory.mkdir()
    for variant in ("a", "b", "panic", "stuck"):
        (directory / f"{variant}.qcow2").symlink_to(getattr(real_images, variant))
    (directory / "halts.raw").write_bytes(halting_boot_sector().ljust(4 << 20, b"\0"))
    (directory / "empty.raw").write_bytes(bytes(64 << 20))
    server = ImageServer(directory)
    await server.start()
    yield server
    await server.stop()


@pytest.fixture(scope="package")
def real_guest(
    libvirt_conn: Any, real_images: RealGuestImages, real_dir: Path, domain_type: str
) -> Iterator[Guest]:
    """A running real guest on image A, booted to multi-user with its agent answering."""
    guest = define(libvirt_conn, real_dir, real_images.a, domain_type, agent=True)
    try:
        began = time.monotonic()
        guest.domain.create()
        guest.wait_for_console(RealGuestImages.marker("A"), 0, BOOT_SECONDS)
        wait_for_agent(guest)
        print(f"real guest {guest.name} reached multi-user in {time.monotonic() - began:.1f} s")
        yield guest
    finally:
        guest.remove()
