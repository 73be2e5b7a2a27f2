"""The one boot check: whether a domain booted its new image, for verify and for pre-flight alike.

First the storage (the running root disk, as QEMU opened it, is an overlay on the new image), then the
request's mode: the guest agent, a console match, or only that the domain keeps running.
"""

from __future__ import annotations

import asyncio
import os
import time
import xml.etree.ElementTree as ET
from typing import Protocol

from temporalio import activity

from activities import domain_xml as dx
from activities import libvirt_domain as ld
from activities.errors import BootCheckFailed, UnsupportedInstance
from activities.root_disks import RootDiskAt, RootDisks
from activities.root_disks.file_overlay import overlay_on_image
from workflows.models import (
    DEFAULT_RUNNING_SECONDS,
    ConsoleRegex,
    VerifyInstanceInput,
    VerifyResult,
    VerifySpec,
    console_regex,
)

# How often a check looks whether the domain still runs (and heartbeats); the agent is asked as often.
POLL_SECONDS = 0.1
# How often a console is looked at for new output: a check ends at the first match, not at the next
# slow poll. A file console's size is a stat on the event loop; only new bytes cost a thread's read.
READ_POLL_SECONDS = 0.01
# How much of a console the boot check reads in one go, and how much of the latest output a pattern
# is matched against: a guest can print without end, and a match is a line or a few.
MAX_CONSOLE_READ = 1 << 20
MATCH_WINDOW = 64 << 10
# How long one guest agent command may take; the agent of a booting guest is not there yet.
AGENT_COMMAND_SECONDS = 2


class BootCheck:
    def __init__(self, libvirt_conn: ld.Libvirt, root_disks: RootDisks | None = None) -> None:
        self.libvirt = libvirt_conn
        # The host's back ends, to ask whether the running disk is the new one; without them (a
        # sandbox, whose disk is always an overlay on the image) the overlay's chain is checked.
        self.root_disks = root_disks

    async def verify(self, request: VerifyInstanceInput) -> VerifyResult:
        """The new image booted, as the request's verify mode proves it (see ``VerifySpec``).

        With no mode: the boot marker on the file console when one is given, else the guest agent where
        the domain has its channel, else the domain still running a few seconds after start.
        """
        began = time.monotonic()
        domain = self.libvirt.domain(request.instance)
        xml = await asyncio.to_thread(domain.definition)
        disk = ""
        if request.root_disk_target is not None and request.image_sha256 is not None:
            disk = "; " + await self._running_on_new_disk(domain, request)
        if request.verify is not None:
            spec = VerifySpec.parse(request.verify)
        elif request.boot_marker is not None:
            await self._wait_for_marker(domain, xml, request)
            return VerifyResult(
                verified_by=f"marker:{request.boot_marker}",
                detail="boot marker on the serial log" + disk,
                seconds=time.monotonic() - began,
            )
        elif dx.has_agent_channel(xml):
            spec = VerifySpec(kind="agent")
        else:
            spec = VerifySpec(
                kind="running", seconds=min(DEFAULT_RUNNING_SECONDS, request.boot_timeout_seconds)
            )
        if spec.kind == "agent":
            if not dx.has_agent_channel(xml):
                raise UnsupportedInstance(
                    f"instance {request.instance!r} has no guest agent channel ({dx.GUEST_AGENT_CHANNEL}) "
                    "to verify by"
                )
            detail = await self._wait_for_agent(domain, request)
        elif spec.kind == "console":
            assert spec.pattern is not None
            detail = await self._wait_for_console(domain, xml, request, spec.pattern)
        else:
            assert spec.seconds is not None
            detail = await self._keep_running(domain, spec.seconds)
        return VerifyResult(verified_by=spec.label(), detail=detail + disk, seconds=time.monotonic() - began)

    async def _running_on_new_disk(self, domain: ld.Domain, request: VerifyInstanceInput) -> str:
        """Proof at the storage level, whatever the verify mode: the disk QEMU opened is the new one
        (``running:N`` cannot tell an empty disk, or the old image, from it)."""
        assert request.root_disk_target is not None and request.image_sha256 is not None
        live = await asyncio.to_thread(domain.live_definition)
        root = RootDiskAt(domain, live, dx.root_disk(live, domain.name, request.root_disk_target))
        if self.root_disks is None or request.rebuild_id is None:
            return await asyncio.to_thread(overlay_on_image, root, request.image_sha256)
        return await self.root_disks.backend(root).running_on_new_disk(root, request)

    async def _ensure_running(self, domain: ld.Domain, waiting_for: str) -> None:
        if not await asyncio.to_thread(domain.is_active):
            raise BootCheckFailed(f"instance {domain.name!r} stopped before {waiting_for}")

    async def _keep_running(self, domain: ld.Domain, seconds: float) -> str:
        if not await asyncio.to_thread(domain.is_active):
            raise BootCheckFailed(f"instance {domain.name!r} is not running after start")
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            activity.heartbeat("checking that the instance keeps running")
            await asyncio.sleep(POLL_SECONDS)
            await self._ensure_running(domain, f"it had run {seconds:g} s")
        return f"still running after {seconds:g} s (which an empty disk would be too)"

    async def _wait_for_agent(self, domain: ld.Domain, request: VerifyInstanceInput) -> str:
        deadline = time.monotonic() + request.boot_timeout_seconds
        while True:
            await self._ensure_running(domain, "its guest agent answered")
            osinfo = await asyncio.to_thread(domain.agent_osinfo, AGENT_COMMAND_SECONDS)
            if osinfo is not None:
                return osinfo
            if time.monotonic() >= deadline:
                raise BootCheckFailed(
                    f"the guest agent of {domain.name!r} did not answer guest-ping within "
                    f"{request.boot_timeout_seconds:g} s"
                )
            activity.heartbeat("waiting for the guest agent")
            await asyncio.sleep(POLL_SECONDS)

    async def _wait_for_console(
        self, domain: ld.Domain, xml: ET.Element, request: VerifyInstanceInput, pattern: str
    ) -> str:
        log = dx.serial_log(xml)
        if log is None and not dx.has_pty_console(xml):
            raise UnsupportedInstance(
                f"instance {domain.name!r} has neither a file nor a pty serial console to read"
            )
        if log is not None:
            source: _Console = _FileConsole(log.path, request.console_offset)
        else:
            source = await asyncio.to_thread(_StreamConsole, domain)
        try:
            return await self._wait_for_output(
                domain, source, console_regex(pattern), f"a match of {pattern!r}", request
            )
        finally:
            await asyncio.to_thread(source.close)

    async def _wait_for_marker(
        self, domain: ld.Domain, xml: ET.Element, request: VerifyInstanceInput
    ) -> None:
        assert request.boot_marker is not None
        log = dx.serial_log(xml)
        if log is None:
            raise UnsupportedInstance(
                f"instance {domain.name!r} has no file serial console to read a boot marker from"
            )
        regex = _Literal(request.boot_marker.encode())
        source = _FileConsole(log.path, request.console_offset)
        await self._wait_for_output(domain, source, regex, repr(request.boot_marker), request)

    async def _wait_for_output(
        self,
        domain: ld.Domain,
        source: _Console,
        regex: ConsoleRegex,
        what: str,
        request: VerifyInstanceInput,
    ) -> str:
        """Read what the console prints as it comes, until ``regex`` matches in the last
        ``MATCH_WINDOW`` bytes, the domain stops, or the boot timeout passes.

        The pattern is RE2's (linear in the window, whatever the pattern), searched in a thread, and
        the deadline and the heartbeat are checked after every read, so a guest that prints without
        end cannot keep the check past its timeout, nor stop the worker from cancelling it."""
        deadline = time.monotonic() + request.boot_timeout_seconds
        seen = b""
        look_again = 0.0
        while True:
            data = await asyncio.to_thread(source.read) if source.may_have_more() else b""
            if data:
                seen = (seen + data)[-MATCH_WINDOW:]
                found = await asyncio.to_thread(regex.search, seen)
                if found:
                    return bytes(found.group(0)).decode(errors="replace")
            now = time.monotonic()
            if now >= deadline:
                raise BootCheckFailed(
                    f"instance {domain.name!r} did not print {what} on its serial console within "
                    f"{request.boot_timeout_seconds:g} s"
                )
            if now >= look_again:
                if not data:
                    await self._ensure_running(domain, f"printing {what}")
                activity.heartbeat(f"waiting for {what} on the console")
                look_again = now + POLL_SECONDS
            if not data:
                await asyncio.sleep(READ_POLL_SECONDS)


class _Literal:
    """A boot marker: found as it is written, no pattern."""

    def __init__(self, marker: bytes) -> None:
        self.marker = marker

    def search(self, text: bytes) -> _Found | None:
        return _Found(self.marker) if self.marker in text else None


class _Found:
    def __init__(self, text: bytes) -> None:
        self.text = text

    def group(self, index: int) -> bytes:
        assert index == 0
        return self.text


class _Console(Protocol):
    def read(self) -> bytes:
        """What the console printed since the last read (b"" when nothing did)."""

    def may_have_more(self) -> bool:
        """Whether a read could find something; cheap enough to ask every few milliseconds."""

    def close(self) -> None: ...


class _FileConsole:
    """A file serial console, read from where it was when the instance stopped."""

    def __init__(self, path: str, offset: int) -> None:
        self.path = path
        self.position = offset

    def read(self) -> bytes:
        try:
            with open(self.path, "rb") as log:
                if os.fstat(log.fileno()).st_size < self.position:
                    # A log that shrank was emptied by a start with append='off': read it all.
                    self.position = 0
                log.seek(self.position)
                data = log.read(MAX_CONSOLE_READ)
        except FileNotFoundError:
            return b""
        self.position += len(data)
        return data

    def may_have_more(self) -> bool:
        try:
            return os.stat(self.path).st_size != self.position
        except FileNotFoundError:
            return False

    def close(self) -> None:
        pass


class _StreamConsole:
    """A pty console through libvirt's console stream, never forced: when another client holds it (or
    takes it with force while the check reads), the check fails with ``ConsoleBusy``."""

    def __init__(self, domain: ld.Domain) -> None:
        self.domain = domain
        self.stream = domain.console()

    def read(self) -> bytes:
        data = self.stream.read()
        if data is None and self.domain.is_active():
            # The console closed under a running domain (another client forced it): reopening tells
            # whether it is still theirs (ConsoleBusy) or free again.
            self.stream.close()
            self.stream = self.domain.console()
            return b""
        return data or b""

    def may_have_more(self) -> bool:
        return True

    def close(self) -> None:
        self.stream.close()


def console_size(log: dx.SerialLog | None) -> int:
    """Where an appending serial log ends now: a later boot check reads only what follows."""
    if log is None or not log.appends:
        return 0
    try:
        return os.stat(log.path).st_size
    except FileNotFoundError:
        return 0
