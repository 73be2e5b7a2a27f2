"""Activities that talk to the hypervisor: inspect, stop, start and verify an instance.

Every blocking libvirt call runs in a thread; waits heartbeat so a dead worker is noticed in seconds.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime

from temporalio import activity

from activities import domain_xml as dx
from activities import libvirt_domain as ld
from activities import rebuildable
from activities.boot_check import BootCheck, console_size
from activities.checkpoints import Checkpoints
from activities.errors import InvalidRequest
from activities.heartbeat import keep_alive
from activities.root_disks import RootDiskAt
from workflows.models import (
    DISK_TARGET,
    InspectInstanceInput,
    InstanceInfo,
    RecordImageInput,
    StartInstanceInput,
    StartResult,
    StopInstanceInput,
    StopMethod,
    StopResult,
    VerifyInstanceInput,
    VerifyResult,
)

POLL_SECONDS = 0.1
# The ACPI button gets this share of the stop timeout (at most AGENT_AFTER_SECONDS) before the guest
# agent is asked too: a guest whose ACPI handling is broken or slow still stops without force.
AGENT_SHARE = 1 / 3
AGENT_AFTER_SECONDS = 10.0
# Inspect asks libvirt whether it would accept the new disk's definition before the image is known:
# any cached image's path stands for it (the path is never opened).
PLANNED_BASE = "/var/lib/durable-rebuild/images/" + "0" * 64


class HypervisorActivities:
    def __init__(
        self,
        libvirt_conn: ld.Libvirt,
        checkpoints: Checkpoints | None = None,
        preflight_by_default: bool = False,
        boot_check: BootCheck | None = None,
    ) -> None:
        self.libvirt = libvirt_conn
        self.checkpoints = checkpoints or Checkpoints()
        self.preflight_by_default = preflight_by_default
        self.boot_check = boot_check or BootCheck(libvirt_conn)

    @activity.defn
    async def inspect_instance(self, request: InspectInstanceInput) -> InstanceInfo:
        """What the rebuild needs to know, and every refusal that can be made while the instance runs."""
        if request.root_disk is not None and not DISK_TARGET.match(request.root_disk):
            raise InvalidRequest(f"not a disk target device: {request.root_disk[:40]!r}")
        domain = self.libvirt.domain(request.instance)

        def read() -> InstanceInfo:
            xml = domain.definition()
            disk = dx.root_disk(xml, request.instance, request.root_disk)
            root = RootDiskAt(domain, xml, disk)
            rebuildable.refuse_unrebuildable(root, request.discard_snapshots)
            planned = dx.rebuilt_disk(dx.disk_element(xml, disk.target), PLANNED_BASE, "qcow2")
            self.libvirt.refuse_invalid_disk(request.instance, xml, planned)
            record = domain.image_record()
            return InstanceInfo(
                name=domain.name,
                uuid=domain.uuid(),
                was_running=domain.is_active(),
                root_disk_path=disk.path,
                root_disk_format=disk.format,
                root_disk_target=disk.target,
                current_image_sha256=record.get("sha256") if record is not None else None,
                current_image_url=record.get("url") if record is not None else None,
                has_identity=dx.current_identity(xml) is not None,
                preflight_by_default=self.preflight_by_default,
            )

        return await asyncio.to_thread(read)

    @activity.defn
    async def stop_instance(self, request: StopInstanceInput) -> StopResult:
        """ACPI first, then the guest agent's shutdown too, then forced off after the timeout.

        An instance already off is a success. A paused or suspended one, or a transient domain, is
        refused before anything (a paused guest ignores ACPI, a transient domain vanishes at the stop).
        """
        domain = self.libvirt.domain(request.instance)
        await asyncio.to_thread(rebuildable.refuse_domain_state, domain)
        state = await asyncio.to_thread(domain.power_state)
        was_running = state != "off"
        stopped_by: StopMethod | None = None
        if was_running:
            # A crashed guest (on_crash='preserve') answers nothing: it is forced off at once.
            timeout = 0 if state == "crashed" else request.timeout_seconds
            stopped_by = await self._shut_down(domain, timeout)
        await self.checkpoints.reach("stop.after-off")
        log = dx.serial_log(await asyncio.to_thread(domain.definition))
        return StopResult(
            was_running=was_running,
            forced=stopped_by == "forced",
            stopped_at=datetime.now(UTC),
            console_offset=console_size(log),
            stopped_by=stopped_by,
        )

    async def _shut_down(self, domain: ld.Domain, timeout_seconds: float) -> StopMethod:
        began = time.monotonic()
        deadline = began + timeout_seconds
        if timeout_seconds <= 0:
            await asyncio.to_thread(domain.force_off)
            return "forced"
        await asyncio.to_thread(domain.press_power_button)
        asked: StopMethod = "acpi"
        agent_at = began + min(timeout_seconds * AGENT_SHARE, AGENT_AFTER_SECONDS)
        while await asyncio.to_thread(domain.is_active):
            activity.heartbeat(f"waiting for guest shutdown ({asked})")
            now = time.monotonic()
            if now >= deadline:
                await asyncio.to_thread(domain.force_off)
                return "forced"
            if asked == "acpi" and now >= agent_at:
                asked = "agent"
                if not await asyncio.to_thread(domain.ask_agent_to_shut_down):
                    # No agent to ask: what stops the guest now is still its ACPI handling.
                    asked = "acpi"
                    agent_at = deadline
            await asyncio.sleep(POLL_SECONDS)
        return asked

    @activity.defn
    async def start_instance(self, request: StartInstanceInput) -> StartResult:
        """An instance already running is a success: a retry after a crash must not fail."""
        async with keep_alive():
            await self.checkpoints.reach("start.before-create")
            already_running = await asyncio.to_thread(self.libvirt.domain(request.instance).start)
            started_at = datetime.now(UTC)
            await self.checkpoints.reach("start.after-create")
            return StartResult(started_at=started_at, already_running=already_running)

    @activity.defn
    async def verify_instance(self, request: VerifyInstanceInput) -> VerifyResult | None:
        """The new image booted, as the request's verify mode proves it (see ``BootCheck``)."""
        return await self.boot_check.verify(request)

    @activity.defn
    async def record_image(self, request: RecordImageInput) -> None:
        """Write the new image into the domain's metadata, where the next rebuild and operators see it."""
        attributes = {
            "sha256": request.image_sha256,
            "url": request.image_url,
            "rebuilt-at": request.rebuilt_at.isoformat(),
        }
        await asyncio.to_thread(self.libvirt.domain(request.instance).record_image, attributes)
