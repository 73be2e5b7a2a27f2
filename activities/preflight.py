"""Pre-flight: boot the new image in a throwaway sandbox while the instance still runs.

Nova and Incus stop the instance first and learn that an image is broken when it fails to boot. Here
the image is booted once beforehand, in a transient domain shaped like the instance (machine type,
firmware, CPU model, memory up to a worker limit) but with nothing that could let it pass for the
instance or reach its networks: no NICs, no other disks, a throwaway overlay on the cached image as its
root disk, its own serial log. It must pass the same verification the rebuild will use.

The sandbox's name derives from the rebuild, so a retry after a crash finds and removes it; a sweep
at worker start removes sandboxes nobody owns any more; a worker runs at most N sandboxes at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import re
import time
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path

from temporalio import activity

from activities import domain_xml as dx
from activities import libvirt_domain as ld
from activities import qemu_img, root_disks
from activities.boot_check import BootCheck
from activities.checkpoints import Checkpoints
from activities.disks import MAX_ROOT_DISK_BYTES
from activities.errors import (
    BootCheckFailed,
    DefinitionRefused,
    HypervisorError,
    ImageTooLarge,
    InstanceNotFound,
    PreflightFailed,
    UnsupportedInstance,
)
from activities.identity_store import IdentityStore
from activities.root_disks import RootDiskAt
from activities.seed_image import build_seed
from activities.state import StateDir
from workflows.identity import GuestIdentity
from workflows.models import PreflightInput, PreflightResult, VerifyInstanceInput, VerifyResult

SANDBOX_PREFIX = "rebuild-preflight-"
# What a sandbox's console shows once its boot is over for good: pre-flight fails there and then rather
# than at the boot timeout (a panicked kernel never recovers, and spins a host core meanwhile).
FATAL_CONSOLE = re.compile(rb"Kernel panic - not syncing[^\r\n]*")
CONSOLE_POLL_SECONDS = 0.5
CONSOLE_TAIL_LINES = 15
_SAFE_NAME = re.compile(r"[^A-Za-z0-9_.-]")


def sandbox_name(rebuild_id: str) -> str:
    return SANDBOX_PREFIX + _SAFE_NAME.sub("_", rebuild_id)[:80]


class PreflightActivities:
    def __init__(
        self,
        libvirt_conn: ld.Libvirt,
        state: StateDir,
        boot_check: BootCheck,
        max_sandboxes: int = 2,
        max_memory_mib: int = 2048,
        checkpoints: Checkpoints | None = None,
    ) -> None:
        self.checkpoints = checkpoints or Checkpoints()
        self.libvirt = libvirt_conn
        self.state = state
        self.boot_check = boot_check
        self.max_sandboxes = max_sandboxes
        self.max_memory_mib = max_memory_mib

    @property
    def _owner_mark(self) -> str:
        """Written into each sandbox: the sweep removes only sandboxes of this worker's state dir."""
        return f"durable-rebuild pre-flight sandbox of {self.state.root}, removed after its check"

    @property
    def directory(self) -> Path:
        return self.state.root / "preflight"

    @activity.defn
    async def preflight_image(self, request: PreflightInput) -> PreflightResult:
        """Boot the image in a sandbox and verify it; the sandbox is gone afterwards, pass or fail."""
        name = sandbox_name(request.rebuild_id)
        image = self.state.image_path(request.image_sha256)
        if request.image_format not in ("raw", "qcow2"):
            raise UnsupportedInstance(f"image format must be raw or qcow2, not {request.image_format[:40]!r}")
        for what, size in (("image", request.image_virtual_size), ("minimum disk", request.min_virtual_size)):
            # Bounded as prepare bounds them: the sandbox's overlay is as large as the new disk.
            if not 0 <= size <= MAX_ROOT_DISK_BYTES:
                raise ImageTooLarge(
                    f"{what} size {size} bytes is over the limit of {MAX_ROOT_DISK_BYTES} bytes"
                )
        self.directory.mkdir(mode=0o711, exist_ok=True)
        os.chmod(self.directory, 0o711)  # noqa: S103 - QEMU's user traverses to the overlay
        overlay = self.directory / f"{name}.qcow2"
        console = self.directory / f"{name}.console.log"
        seed = self.directory / f"{name}.seed.iso"
        began = time.monotonic()
        # A crashed or retried attempt left its sandbox: it goes first. A domain of that name that is
        # not this worker's sandbox (persistent, or without its owner mark) is left alone, and refused.
        if await asyncio.to_thread(self._remove_sandbox, name):
            raise PreflightFailed(
                f"a domain named {name!r} exists and is not a pre-flight sandbox of this worker "
                "(persistent, or without its owner mark): left alone, pre-flight cannot use its name"
            )
        async with self._slot():
            waited = time.monotonic() - began
            try:
                domain = self.libvirt.domain(request.instance)
                xml = await asyncio.to_thread(domain.definition)
                disk = dx.step_root_disk(xml, request.instance, request.root_disk_target)
                old = await root_disks.virtual_size(RootDiskAt(domain, xml, disk))
                size = max(old, request.image_virtual_size, request.min_virtual_size)
                overlay.unlink(missing_ok=True)
                await qemu_img.create_overlay(str(overlay), str(image), request.image_format, size)
                console.write_bytes(b"")
                seed_path = None
                identity = IdentityStore(self.state).load(xml)
                if request.change is not None:
                    identity = request.change.applied_to(identity or GuestIdentity())
                if identity is not None:
                    # The seed the rebuild will attach, under a throwaway instance-id.
                    seed_path = seed
                    await asyncio.to_thread(build_seed, identity, f"preflight-{request.rebuild_id}", seed)
                definition = dx.sandbox_definition(
                    xml,
                    name,
                    dx.rebuilt_disk(dx.disk_element(xml, disk.target), str(image), request.image_format),
                    overlay,
                    console,
                    seed_path,
                    max_memory_mib=self.max_memory_mib,
                    description=self._owner_mark,
                    owner=self._owner_mark,
                )
                await asyncio.to_thread(self._create, name, definition)
                await self.checkpoints.reach("preflight.after-create")
                # The same check the rebuild's verify step makes, on the sandbox instead.
                verified = await verified_unless_fatal(
                    self.boot_check.verify(
                        VerifyInstanceInput(
                            instance=name,
                            verify=request.verify,
                            boot_marker=request.boot_marker,
                            boot_timeout_seconds=request.boot_timeout_seconds,
                            root_disk_target=disk.target,
                            image_sha256=request.image_sha256,
                        )
                    ),
                    console,
                )
            except BootCheckFailed as err:
                raise PreflightFailed(
                    f"pre-flight boot of image {request.image_sha256[:12]} failed: {err.message}; "
                    f"the instance was never stopped. Sandbox console, last lines:\n{_tail(console)}"
                ) from None
            finally:
                await asyncio.to_thread(self._remove_sandbox, name)
        return PreflightResult(
            verified_by=verified.verified_by if verified else "running",
            detail=verified.detail if verified else "",
            seconds=time.monotonic() - began,
            waited_seconds=waited,
        )

    def _create(self, name: str, definition: str) -> None:
        try:
            self.libvirt.create_transient(name, definition)
        except (HypervisorError, DefinitionRefused) as err:
            raise PreflightFailed(f"libvirt could not start the pre-flight sandbox: {err.message}") from None

    def _remove_sandbox(self, name: str) -> bool:
        """Destroy this worker's sandbox ``name`` and delete its files; what is already gone is fine.

        Only a transient domain that carries this worker's owner mark is destroyed (destroying a
        transient domain removes it: nothing is ever undefined). Another domain of that name, a
        persistent one above all, is left alone with the files: True says one is in the way.
        """
        domain = self.libvirt.domain(name)
        try:
            persistent = domain.is_persistent()
            owner = dx.sandbox_owner(domain.live_definition())
        except InstanceNotFound:
            pass
        else:
            if persistent or owner != self._owner_mark:
                return True
            with contextlib.suppress(InstanceNotFound):
                domain.force_off()
        for suffix in (".qcow2", ".console.log", ".seed.iso"):
            (self.directory / f"{name}{suffix}").unlink(missing_ok=True)
        return False

    def sweep(self) -> list[str]:
        """At worker start: remove the sandboxes nobody owns any more.

        A running pre-flight holds one of the host's slot locks; when every slot can be taken, no
        pre-flight runs here, and every sandbox left is a crashed attempt's.
        """
        if not self.directory.exists():
            return []
        held = []
        try:
            for index in range(self.max_sandboxes):
                fd = os.open(self.directory / f"slot-{index}.lock", os.O_RDWR | os.O_CREAT, 0o600)
                held.append(fd)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    return []
            removed = []
            for name in self.libvirt.domain_names():
                if not name.startswith(SANDBOX_PREFIX):
                    continue
                try:
                    domain = self.libvirt.domain(name)
                    ours = not domain.is_persistent() and dx.sandbox_owner(domain.live_definition())
                except InstanceNotFound:
                    continue  # another worker's transient sandbox, gone since the listing
                if ours == self._owner_mark and not self._remove_sandbox(name):
                    removed.append(name)
            for leftover in self.directory.glob(f"{SANDBOX_PREFIX}*"):
                leftover.unlink(missing_ok=True)
            return removed
        finally:
            for fd in held:
                os.close(fd)

    @contextlib.asynccontextmanager
    async def _slot(self) -> AsyncIterator[None]:
        """One of the host's ``max_sandboxes`` slots (flock: a dead worker's slot frees itself)."""
        self.directory.mkdir(mode=0o711, exist_ok=True)
        while True:
            for index in range(self.max_sandboxes):
                fd = os.open(self.directory / f"slot-{index}.lock", os.O_RDWR | os.O_CREAT, 0o600)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(fd)
                    continue
                try:
                    yield
                finally:
                    os.close(fd)
                return
            activity.heartbeat(f"waiting for a pre-flight slot: all {self.max_sandboxes} in use")
            await asyncio.sleep(0.5)


async def verified_unless_fatal(check: Awaitable[VerifyResult | None], console: Path) -> VerifyResult | None:
    """The verification's result, unless the console shows a fatal line first."""
    verify = asyncio.ensure_future(check)
    watch = asyncio.ensure_future(_watch_for_fatal(console))
    try:
        done, _ = await asyncio.wait({verify, watch}, return_when=asyncio.FIRST_COMPLETED)
        if watch in done:
            watch.result()
        return verify.result()
    finally:
        for task in (verify, watch):
            task.cancel()
        await asyncio.gather(verify, watch, return_exceptions=True)


async def _watch_for_fatal(console: Path) -> None:
    """Raise BootCheckFailed once the console shows a fatal line; until then, watch it grow."""
    offset = 0
    while True:
        await asyncio.sleep(CONSOLE_POLL_SECONDS)
        # Back a little, for a line split between two reads; at most 1 MiB a round, however much it prints.
        start = max(0, offset - 256)
        try:
            chunk = await asyncio.to_thread(_read_at, console, start, 1 << 20)
        except FileNotFoundError:
            continue
        offset = start + len(chunk)
        if match := FATAL_CONSOLE.search(chunk):
            line = match.group().decode(errors="replace").strip()
            raise BootCheckFailed(f"its console says {line!r}, so it will never boot")


def _read_at(path: Path, offset: int, size: int) -> bytes:
    with open(path, "rb") as log:
        log.seek(offset)
        return log.read(size)


def _tail(console: Path) -> str:
    try:
        text = console.read_bytes()[-64 << 10 :].decode(errors="replace")
    except FileNotFoundError:
        return "(no console output)"
    lines = [line.rstrip() for line in text.replace("\r", "\n").splitlines() if line.strip()]
    shown = "\n".join(lines[-CONSOLE_TAIL_LINES:])
    return shown or "(no console output)"
