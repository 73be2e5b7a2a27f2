"""Activities that talk to the hypervisor: inspect, stop, start and verify an instance.

Every blocking libvirt call runs in a thread; waits heartbeat so a dead worker is noticed in seconds.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

import libvirt
from temporalio import activity

from activities import libvirt_domain as ld
from activities.checkpoints import Checkpoints
from activities.errors import BootCheckFailed, InstanceStartFailed, UnsupportedInstance
from activities.heartbeat import keep_alive
from activities.identity import current_identity
from workflows.models import (
    InspectInstanceInput,
    InstanceInfo,
    RecordImageInput,
    StartInstanceInput,
    StartResult,
    StopInstanceInput,
    StopResult,
    VerifyInstanceInput,
)

T = TypeVar("T")
POLL_SECONDS = 0.1
# How much of a serial log the boot check reads at most: a guest can print without end.
MAX_CONSOLE_READ = 4 << 20


def _console_size(log: ld.SerialLog | None) -> int:
    if log is None or not log.appends:
        return 0
    try:
        return os.stat(log.path).st_size
    except FileNotFoundError:
        return 0


class HypervisorActivities:
    def __init__(
        self,
        libvirt_conn: ld.Libvirt,
        checkpoints: Checkpoints | None = None,
        preflight_by_default: bool = False,
    ) -> None:
        self.libvirt = libvirt_conn
        self.checkpoints = checkpoints or Checkpoints()
        self.preflight_by_default = preflight_by_default

    async def _on_domain(self, instance: str, action: Callable[[Any], T]) -> T:
        return await asyncio.to_thread(self.libvirt.with_domain, instance, action)

    @activity.defn
    async def inspect_instance(self, request: InspectInstanceInput) -> InstanceInfo:
        def read(domain: Any) -> InstanceInfo:
            xml = ld.inactive_xml(domain)
            disk = ld.root_disk(xml, request.instance)
            meta = ld.image_metadata(domain)
            return InstanceInfo(
                name=domain.name(),
                uuid=domain.UUIDString(),
                was_running=ld.is_active(domain),
                root_disk_path=disk.path,
                root_disk_format=disk.format,
                root_disk_target=disk.target,
                current_image_sha256=meta.get("sha256") if meta is not None else None,
                has_identity=current_identity(xml) is not None,
                preflight_by_default=self.preflight_by_default,
            )

        return await self._on_domain(request.instance, read)

    @activity.defn
    async def stop_instance(self, request: StopInstanceInput) -> StopResult:
        """ACPI shutdown, then forced off after the timeout. An instance already off is a success."""
        was_running = await self._on_domain(request.instance, ld.is_active)
        forced = False
        if was_running:
            await self._on_domain(request.instance, _request_shutdown)
            deadline = time.monotonic() + request.timeout_seconds
            while await self._on_domain(request.instance, ld.is_active):
                activity.heartbeat("waiting for guest shutdown")
                if time.monotonic() >= deadline:
                    forced = True
                    await self._on_domain(request.instance, _force_off)
                    continue
                await asyncio.sleep(POLL_SECONDS)
        await self.checkpoints.reach("stop.after-off")
        log = await self._on_domain(request.instance, lambda d: ld.serial_log(ld.inactive_xml(d)))
        return StopResult(
            was_running=was_running,
            forced=forced,
            stopped_at=datetime.now(UTC),
            console_offset=_console_size(log),
        )

    @activity.defn
    async def start_instance(self, request: StartInstanceInput) -> StartResult:
        """An instance already running is a success: a retry after a crash must not fail."""
        async with keep_alive():
            await self.checkpoints.reach("start.before-create")
            already_running = await self._on_domain(request.instance, _start_domain)
            started_at = datetime.now(UTC)
            await self.checkpoints.reach("start.after-create")
            return StartResult(started_at=started_at, already_running=already_running)

    @activity.defn
    async def verify_instance(self, request: VerifyInstanceInput) -> None:
        """Running, and when a boot marker is given, the marker printed on this boot's serial log."""
        if request.boot_marker is None:
            if not await self._on_domain(request.instance, ld.is_active):
                raise BootCheckFailed(f"instance {request.instance!r} is not running after start")
            return
        log = await self._on_domain(request.instance, lambda d: ld.serial_log(ld.inactive_xml(d)))
        if log is None:
            raise UnsupportedInstance(
                f"instance {request.instance!r} has no file serial console to read a boot marker from"
            )
        marker = request.boot_marker.encode()
        deadline = time.monotonic() + request.boot_timeout_seconds
        while True:
            if await asyncio.to_thread(_log_contains, log.path, request.console_offset, marker):
                return
            if not await self._on_domain(request.instance, ld.is_active):
                raise BootCheckFailed(
                    f"instance {request.instance!r} stopped before printing {request.boot_marker!r}"
                )
            if time.monotonic() >= deadline:
                raise BootCheckFailed(
                    f"instance {request.instance!r} did not print {request.boot_marker!r} on its "
                    f"serial console within {request.boot_timeout_seconds:g} s"
                )
            activity.heartbeat("waiting for boot marker")
            await asyncio.sleep(POLL_SECONDS)

    @activity.defn
    async def record_image(self, request: RecordImageInput) -> None:
        """Write the new image into the domain's metadata, where the next rebuild and operators see it."""
        attributes = {
            "sha256": request.image_sha256,
            "url": request.image_url,
            "rebuilt-at": request.rebuilt_at.isoformat(),
        }
        await self._on_domain(request.instance, lambda domain: ld.set_image_metadata(domain, attributes))


def _start_domain(domain: Any) -> bool:
    """Start the domain; True when it was running already."""
    if ld.is_active(domain):
        return True
    try:
        domain.create()
    except libvirt.libvirtError as err:
        if ld.is_active(domain):
            return True
        raise InstanceStartFailed(
            f"libvirt could not start {domain.name()!r}: {err.get_error_message()}"
        ) from None
    return False


def _request_shutdown(domain: Any) -> None:
    try:
        domain.shutdown()
    except libvirt.libvirtError:
        if ld.is_active(domain):
            raise


def _force_off(domain: Any) -> None:
    try:
        domain.destroy()
    except libvirt.libvirtError:
        if ld.is_active(domain):
            raise


def _log_contains(path: str, offset: int, marker: bytes) -> bool:
    try:
        with open(path, "rb") as log:
            size = os.fstat(log.fileno()).st_size
            # A log that shrank was emptied by a start with append='off': read it all.
            log.seek(offset if offset <= size else 0)
            return marker in log.read(MAX_CONSOLE_READ)
    except FileNotFoundError:
        return False
