"""Activities that talk to the hypervisor: inspect, stop, start and verify an instance.

Every blocking libvirt call runs in a thread; waits heartbeat so a dead worker is noticed in seconds.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, TypeVar

import libvirt
from temporalio import activity

from activities import domain_xml as dx
from activities import libvirt_domain as ld
from activities import rebuildable
from activities.checkpoints import Checkpoints
from activities.errors import BootCheckFailed, InstanceStartFailed, InvalidRequest, UnsupportedInstance
from activities.heartbeat import keep_alive
from activities.identity import current_identity
from workflows.models import (
    DEFAULT_RUNNING_SECONDS,
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
    VerifySpec,
)

T = TypeVar("T")
POLL_SECONDS = 0.1
# How much of a serial log the boot check reads at most: a guest can print without end.
MAX_CONSOLE_READ = 4 << 20
# The ACPI button gets this share of the stop timeout (at most AGENT_AFTER_SECONDS) before the guest
# agent is asked too: a guest whose ACPI handling is broken or slow still stops without force.
AGENT_SHARE = 1 / 3
AGENT_AFTER_SECONDS = 10.0
# How long one guest agent command may take; the agent of a booting guest is not there yet.
AGENT_COMMAND_SECONDS = 2
# Inspect asks libvirt whether it would accept the new disk's definition before the image is known:
# any cached image's path stands for it (the path is never opened).
PLANNED_BASE = "/var/lib/durable-rebuild/images/" + "0" * 64


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
        """What the rebuild needs to know, and every refusal that can be made while the instance runs."""
        if request.root_disk is not None and not DISK_TARGET.match(request.root_disk):
            raise InvalidRequest(f"not a disk target device: {request.root_disk[:40]!r}")

        def read(domain: Any) -> InstanceInfo:
            xml = ld.inactive_xml(domain)
            disk = dx.root_disk(xml, request.instance, request.root_disk)
            conn = self.libvirt.connection()
            rebuildable.refuse_unrebuildable(conn, domain, disk, request.discard_snapshots)
            planned = dx.rebuilt_disk(dx.disk_element(xml, disk.target), PLANNED_BASE, "qcow2")
            ld.refuse_invalid_definition(conn, request.instance, xml, planned)
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
        """ACPI first, then the guest agent's shutdown too, then forced off after the timeout.

        An instance already off is a success.
        """
        state = await self._on_domain(request.instance, _power_state)
        was_running = state != "off"
        stopped_by: StopMethod | None = None
        if was_running:
            # A crashed guest (on_crash='preserve') answers nothing: it is forced off at once.
            timeout = 0 if state == "crashed" else request.timeout_seconds
            stopped_by = await self._shut_down(request.instance, timeout)
        await self.checkpoints.reach("stop.after-off")
        log = await self._on_domain(request.instance, lambda d: ld.serial_log(ld.inactive_xml(d)))
        return StopResult(
            was_running=was_running,
            forced=stopped_by == "forced",
            stopped_at=datetime.now(UTC),
            console_offset=_console_size(log),
            stopped_by=stopped_by,
        )

    async def _shut_down(self, instance: str, timeout_seconds: float) -> StopMethod:
        began = time.monotonic()
        deadline = began + timeout_seconds
        if timeout_seconds <= 0:
            await self._on_domain(instance, _force_off)
            return "forced"
        await self._on_domain(instance, _press_power_button)
        asked: StopMethod = "acpi"
        agent_at = began + min(timeout_seconds * AGENT_SHARE, AGENT_AFTER_SECONDS)
        while await self._on_domain(instance, ld.is_active):
            activity.heartbeat(f"waiting for guest shutdown ({asked})")
            now = time.monotonic()
            if now >= deadline:
                await self._on_domain(instance, _force_off)
                return "forced"
            if asked == "acpi" and now >= agent_at:
                asked = "agent"
                if not await self._on_domain(instance, _ask_agent_to_shut_down):
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
            already_running = await self._on_domain(request.instance, _start_domain)
            started_at = datetime.now(UTC)
            await self.checkpoints.reach("start.after-create")
            return StartResult(started_at=started_at, already_running=already_running)

    @activity.defn
    async def verify_instance(self, request: VerifyInstanceInput) -> VerifyResult | None:
        """The new image booted, as the request's verify mode proves it (see ``VerifySpec``).

        With no mode: the boot marker on the file console when one is given, else the guest agent where
        the domain has its channel, else the domain still running a few seconds after start.
        """
        began = time.monotonic()
        xml = await self._on_domain(request.instance, ld.inactive_xml)
        disk = ""
        if request.root_disk_target is not None and request.image_sha256 is not None:
            target, sha256 = request.root_disk_target, request.image_sha256
            disk = "; " + await self._on_domain(
                request.instance, lambda domain: _running_on_image(domain, target, sha256)
            )
        if request.verify is not None:
            spec = VerifySpec.parse(request.verify)
        elif request.boot_marker is not None:
            await self._wait_for_marker(request)
            return VerifyResult(
                verified_by=f"marker:{request.boot_marker}",
                detail="boot marker on the serial log" + disk,
                seconds=time.monotonic() - began,
            )
        elif ld.has_agent_channel(xml):
            spec = VerifySpec(kind="agent")
        else:
            spec = VerifySpec(
                kind="running", seconds=min(DEFAULT_RUNNING_SECONDS, request.boot_timeout_seconds)
            )
        if spec.kind == "agent":
            if not ld.has_agent_channel(xml):
                raise UnsupportedInstance(
                    f"instance {request.instance!r} has no guest agent channel ({ld.GUEST_AGENT_CHANNEL}) "
                    "to verify by"
                )
            detail = await self._wait_for_agent(request)
        elif spec.kind == "console":
            assert spec.pattern is not None
            detail = await self._wait_for_console(request, xml, spec.pattern)
        else:
            assert spec.seconds is not None
            detail = await self._keep_running(request.instance, spec.seconds)
        return VerifyResult(verified_by=spec.label(), detail=detail + disk, seconds=time.monotonic() - began)

    async def _ensure_running(self, instance: str, waiting_for: str) -> None:
        if not await self._on_domain(instance, ld.is_active):
            raise BootCheckFailed(f"instance {instance!r} stopped before {waiting_for}")

    async def _keep_running(self, instance: str, seconds: float) -> str:
        if not await self._on_domain(instance, ld.is_active):
            raise BootCheckFailed(f"instance {instance!r} is not running after start")
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            activity.heartbeat("checking that the instance keeps running")
            await asyncio.sleep(POLL_SECONDS)
            await self._ensure_running(instance, f"it had run {seconds:g} s")
        return f"still running after {seconds:g} s (which an empty disk would be too)"

    async def _wait_for_agent(self, request: VerifyInstanceInput) -> str:
        deadline = time.monotonic() + request.boot_timeout_seconds
        while True:
            await self._ensure_running(request.instance, "its guest agent answered")
            osinfo = await self._on_domain(request.instance, _agent_osinfo)
            if osinfo is not None:
                return osinfo
            if time.monotonic() >= deadline:
                raise BootCheckFailed(
                    f"the guest agent of {request.instance!r} did not answer guest-ping within "
                    f"{request.boot_timeout_seconds:g} s"
                )
            activity.heartbeat("waiting for the guest agent")
            await asyncio.sleep(POLL_SECONDS * 5)

    async def _wait_for_console(self, request: VerifyInstanceInput, xml: Any, pattern: str) -> str:
        regex = re.compile(pattern.encode())
        log = ld.serial_log(xml)
        if log is not None:
            return await self._wait_for_log(request, log.path, regex, f"console:{pattern}")
        if not ld.has_pty_console(xml):
            raise UnsupportedInstance(
                f"instance {request.instance!r} has neither a file nor a pty serial console to read"
            )
        stream = await self._on_domain(request.instance, ld.ConsoleStream)
        try:
            seen = b""
            deadline = time.monotonic() + request.boot_timeout_seconds
            while True:
                data = await asyncio.to_thread(_read_console, stream, request.instance)
                if data is None:
                    await self._ensure_running(request.instance, f"printing a match of {pattern!r}")
                    # The console closed under a running domain (another client forced it): reopen.
                    stream.close()
                    stream = await self._on_domain(request.instance, ld.ConsoleStream)
                    continue
                seen = (seen + data)[-MAX_CONSOLE_READ:]
                found = regex.search(seen)
                if found:
                    return found.group(0).decode(errors="replace")
                if not data:
                    await self._ensure_running(request.instance, f"printing a match of {pattern!r}")
                    if time.monotonic() >= deadline:
                        raise BootCheckFailed(
                            f"instance {request.instance!r} printed no match of {pattern!r} on its "
                            f"console within {request.boot_timeout_seconds:g} s"
                        )
                    activity.heartbeat("waiting for the console")
                    await asyncio.sleep(POLL_SECONDS)
        finally:
            await asyncio.to_thread(stream.close)

    async def _wait_for_marker(self, request: VerifyInstanceInput) -> None:
        assert request.boot_marker is not None
        log = await self._on_domain(request.instance, lambda d: ld.serial_log(ld.inactive_xml(d)))
        if log is None:
            raise UnsupportedInstance(
                f"instance {request.instance!r} has no file serial console to read a boot marker from"
            )
        await self._wait_for_log(
            request, log.path, re.compile(re.escape(request.boot_marker.encode())), request.boot_marker
        )

    async def _wait_for_log(
        self, request: VerifyInstanceInput, path: str, regex: re.Pattern[bytes], what: str
    ) -> str:
        deadline = time.monotonic() + request.boot_timeout_seconds
        while True:
            found = await asyncio.to_thread(_log_search, path, request.console_offset, regex)
            if found is not None:
                return found
            if not await self._on_domain(request.instance, ld.is_active):
                raise BootCheckFailed(f"instance {request.instance!r} stopped before printing {what!r}")
            if time.monotonic() >= deadline:
                raise BootCheckFailed(
                    f"instance {request.instance!r} did not print {what!r} on its "
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


def _running_on_image(domain: Any, target: str, sha256: str) -> str:
    """The running root disk, as QEMU opened it, is an overlay on the new image and nothing else.

    Proof at the storage level, whatever the verify mode: a definition that kept an old chain would
    run the old base, one that kept ``<backingStore/>`` an empty disk, and ``running:N`` sees neither.
    """
    chain = dx.chain(dx.disk_element(ld.live_xml(domain), target))
    base = chain[-1][0] if len(chain) == 2 else None
    if base is None or Path(base).name != sha256:
        layers = " on ".join(str(path) for path, _ in chain)
        raise BootCheckFailed(
            f"instance {domain.name()!r} runs its root disk {target} as {layers}, not as an overlay "
            f"on image {sha256[:12]}"
        )
    return f"root disk {target} runs on image {sha256[:12]}"


def _power_state(domain: Any) -> Literal["off", "running", "crashed"]:
    """Whether there is a guest to stop; a paused or suspended one, or a transient domain, is refused
    (a paused guest ignores ACPI, and a transient domain would vanish at the stop)."""
    rebuildable.refuse_domain_state(domain)
    if not ld.is_active(domain):
        return "off"
    return "crashed" if domain.state()[0] == libvirt.VIR_DOMAIN_CRASHED else "running"


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


def _press_power_button(domain: Any) -> None:
    """ACPI only: libvirt's default would pick the guest agent first where one is configured."""
    try:
        domain.shutdownFlags(libvirt.VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN)
    except libvirt.libvirtError as err:
        if not ld.is_active(domain):
            return
        if err.get_error_code() not in (libvirt.VIR_ERR_INVALID_ARG, libvirt.VIR_ERR_NO_SUPPORT):
            raise
        # A driver without the ACPI flag (libvirt's test driver) takes a plain shutdown request.
        domain.shutdown()


def _ask_agent_to_shut_down(domain: Any) -> bool:
    """``guest-shutdown`` through the agent, when the domain has one that answers; True when asked."""
    if not ld.has_agent_channel(ld.inactive_xml(domain)):
        return False
    try:
        ld.agent_command(domain, "guest-ping", AGENT_COMMAND_SECONDS)
        domain.shutdownFlags(libvirt.VIR_DOMAIN_SHUTDOWN_GUEST_AGENT)
    except libvirt.libvirtError:
        # No agent, or it went away because the guest is already going down.
        return False
    return True


def _agent_osinfo(domain: Any) -> str | None:
    """The guest's OS as its agent reports it, or None while the agent does not answer."""
    try:
        ld.agent_command(domain, "guest-ping", AGENT_COMMAND_SECONDS)
        info = ld.agent_command(domain, "guest-get-osinfo", AGENT_COMMAND_SECONDS)
    except libvirt.libvirtError:
        return None
    name = info.get("pretty-name") if isinstance(info, dict) else None
    return f"guest agent answers: {name or 'unknown OS'}"


def _force_off(domain: Any) -> None:
    try:
        domain.destroy()
    except libvirt.libvirtError:
        if ld.is_active(domain):
            raise


def _read_console(stream: ld.ConsoleStream, instance: str) -> bytes | None:
    try:
        return stream.read()
    except libvirt.libvirtError as err:
        raise ld.translate(err, instance) from None


def _log_search(path: str, offset: int, regex: re.Pattern[bytes]) -> str | None:
    try:
        with open(path, "rb") as log:
            size = os.fstat(log.fileno()).st_size
            # A log that shrank was emptied by a start with append='off': read it all.
            log.seek(offset if offset <= size else 0)
            found = regex.search(log.read(MAX_CONSOLE_READ))
    except FileNotFoundError:
        return None
    return found.group(0).decode(errors="replace") if found else None
