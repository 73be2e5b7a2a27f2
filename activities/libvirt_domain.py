"""A thin, typed layer over libvirt: one connection per worker, errors translated once, here.

The domain XML is the source of truth for disk paths and formats. We read it with a real XML parser and
change it only by defining a new inactive definition through libvirt.
"""

from __future__ import annotations

import contextlib
import json
import threading
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import libvirt
import libvirt_qemu

from activities import domain_xml as dx
from activities.domain_xml import RootDisk as RootDisk
from activities.domain_xml import root_disk as root_disk
from activities.errors import (
    DefinitionRefused,
    HypervisorError,
    HypervisorUnavailable,
    InstanceNotFound,
    UnsupportedInstance,
)

METADATA_NAMESPACE = "https://github.com/durable-rebuild/rebuild/1"
METADATA_PREFIX = "rebuild"
GUEST_AGENT_CHANNEL = "org.qemu.guest_agent.0"

T = TypeVar("T")

_CONNECTION_LOST = {
    libvirt.VIR_ERR_NO_CONNECT,
    libvirt.VIR_ERR_INVALID_CONN,
    libvirt.VIR_ERR_SYSTEM_ERROR,
    libvirt.VIR_ERR_RPC,
}


# What libvirt answers to a definition it will never accept: no retry changes that.
_DEFINITION_REFUSED = {
    libvirt.VIR_ERR_CONFIG_UNSUPPORTED,
    libvirt.VIR_ERR_XML_ERROR,
    libvirt.VIR_ERR_XML_DETAIL,
    libvirt.VIR_ERR_INVALID_ARG,
    libvirt.VIR_ERR_NO_SECRET,
}


def _silence_libvirt(_ctx: object, _err: object) -> None:
    """libvirt prints every error to stderr unless a handler is set; we report them ourselves."""


libvirt.registerErrorHandler(_silence_libvirt, None)

_events_lock = threading.Lock()
_events_running = False


def _run_events() -> None:
    while True:
        libvirt.virEventRunDefaultImpl()


def ensure_event_loop() -> None:
    """Run libvirt's default event loop in a thread, once per process, before any connection opens.

    A console stream delivers the guest's output only through an event loop; without one, ``recv`` on a
    non-blocking stream never sees data (checked against qemu:///system).
    """
    global _events_running
    with _events_lock:
        if not _events_running:
            libvirt.virEventRegisterDefaultImpl()
            threading.Thread(target=_run_events, name="libvirt-events", daemon=True).start()
            _events_running = True


def translate(err: libvirt.libvirtError, instance: str) -> Exception:
    """Turn libvirt's C-style error into one of ours, without chaining the noise."""
    code = err.get_error_code()
    message = err.get_error_message() or str(err)
    if code == libvirt.VIR_ERR_NO_DOMAIN:
        return InstanceNotFound(f"instance {instance!r} is not defined on this host")
    if code in _CONNECTION_LOST:
        return HypervisorUnavailable(f"libvirt is unreachable: {message}")
    if code in _DEFINITION_REFUSED:
        return DefinitionRefused(f"libvirt refused the definition of {instance!r}: {message}")
    return HypervisorError(f"libvirt refused an operation on {instance!r}: {message}")


class Libvirt:
    """One shared connection, opened lazily and reopened when it dies.

    Sharing matters for more than speed: every open of a ``test://FILE`` URI starts from the file
    again, so tests that used a fresh connection per call would never see their own changes.
    """

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self._conn: Any = None
        self._lock = threading.Lock()

    def connection(self) -> Any:
        with self._lock:
            if self._conn is not None:
                try:
                    if self._conn.isAlive():
                        return self._conn
                except libvirt.libvirtError:
                    pass
            ensure_event_loop()
            try:
                self._conn = libvirt.open(self.uri)
            except libvirt.libvirtError as err:
                raise HypervisorUnavailable(
                    f"cannot connect to libvirt at {self.uri}: {err.get_error_message()}"
                ) from None
            return self._conn

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                with contextlib.suppress(libvirt.libvirtError):
                    self._conn.close()
                self._conn = None

    def with_domain(self, instance: str, action: Callable[[Any], T]) -> T:
        """Run ``action`` on the domain, with libvirt's errors translated. Blocking: call in a thread."""
        try:
            domain = self.connection().lookupByName(instance)
            return action(domain)
        except libvirt.libvirtError as err:
            raise translate(err, instance) from None

    def define(self, instance: str, xml: str) -> None:
        try:
            self.connection().defineXML(xml)
        except libvirt.libvirtError as err:
            raise translate(err, instance) from None


def inactive_xml(domain: Any) -> ET.Element:
    """The persistent definition: what the next start will use, and what we change."""
    flags = libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE
    return dx.parse(domain.XMLDesc(flags))


def live_xml(domain: Any) -> ET.Element:
    """What runs now: for a running domain, the disks' backing chains as QEMU opened them."""
    return dx.parse(domain.XMLDesc(0))


def is_active(domain: Any) -> bool:
    return bool(domain.isActive())


@dataclass(frozen=True)
class SerialLog:
    path: str
    # With append='off' (the default) libvirt empties the file at each start.
    appends: bool


def serial_log(xml: ET.Element) -> SerialLog | None:
    """The file a ``<serial type='file'>`` (or console) writes to, where the boot check reads."""
    for kind in ("serial", "console"):
        for dev in xml.findall(f"./devices/{kind}"):
            source = dev.find("source")
            if dev.get("type") == "file" and source is not None and source.get("path"):
                return SerialLog(path=str(source.get("path")), appends=source.get("append") == "on")
    return None


def image_metadata(domain: Any) -> ET.Element | None:
    try:
        raw = domain.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, METADATA_NAMESPACE, 0)
    except libvirt.libvirtError as err:
        if err.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN_METADATA:
            return None
        raise
    return ET.fromstring(raw)


def set_image_metadata(domain: Any, attributes: dict[str, str]) -> None:
    element = ET.Element("image", attributes)
    domain.setMetadata(
        libvirt.VIR_DOMAIN_METADATA_ELEMENT,
        ET.tostring(element, encoding="unicode"),
        METADATA_PREFIX,
        METADATA_NAMESPACE,
        libvirt.VIR_DOMAIN_AFFECT_CONFIG | (libvirt.VIR_DOMAIN_AFFECT_LIVE if is_active(domain) else 0),
    )


def has_agent_channel(xml: ET.Element) -> bool:
    """Whether the definition gives the guest a QEMU guest agent channel (the agent may still be absent)."""
    return any(
        target.get("type") == "virtio" and target.get("name") == GUEST_AGENT_CHANNEL
        for target in xml.findall("./devices/channel/target")
    )


def has_pty_console(xml: ET.Element) -> bool:
    """A serial port or console on a pty: what libvirt's console stream can read."""
    return any(
        dev.get("type") == "pty" for kind in ("serial", "console") for dev in xml.findall(f"./devices/{kind}")
    )


def agent_command(domain: Any, command: str, timeout_seconds: int) -> Any:
    """One guest agent command; the agent's ``return`` value. Raises libvirtError when it does not answer."""
    answer = libvirt_qemu.qemuAgentCommand(domain, json.dumps({"execute": command}), timeout_seconds, 0)
    return json.loads(answer).get("return") if answer else None


class ConsoleStream:
    """The domain's first serial console, read through libvirt's stream (works for ``pty`` consoles).

    Opened with FORCE: a console left open by an earlier attempt of the same check must not block it.
    """

    def __init__(self, domain: Any) -> None:
        self._stream = domain.connect().newStream(libvirt.VIR_STREAM_NONBLOCK)
        try:
            domain.openConsole(None, self._stream, libvirt.VIR_DOMAIN_CONSOLE_FORCE)
        except libvirt.libvirtError:
            with contextlib.suppress(libvirt.libvirtError):
                self._stream.abort()
            raise

    def read(self) -> bytes | None:
        """What arrived since the last read (b"" when nothing did); None once the console closed."""
        data = self._stream.recv(64 << 10)
        if data == -2:
            return b""
        return bytes(data) or None

    def close(self) -> None:
        with contextlib.suppress(libvirt.libvirtError):
            self._stream.abort()


def optional(call: Callable[[], T], unsupported: T) -> T:
    """A query some drivers lack (the test driver has no jobs): its absence means "none"."""
    try:
        return call()
    except libvirt.libvirtError as err:
        if err.get_error_code() in (libvirt.VIR_ERR_NO_SUPPORT, libvirt.VIR_ERR_OPERATION_INVALID):
            return unsupported
        raise


def snapshot_names(domain: Any) -> list[str]:
    snapshots: list[Any] = optional(lambda: domain.listAllSnapshots(0), [])
    return sorted(s.getName() for s in snapshots)


def drop_snapshot_metadata(domain: Any, names: list[str]) -> None:
    """Forget these snapshots in libvirt (their data went with the old disk); gone ones are fine."""
    for name in names:
        try:
            domain.snapshotLookupByName(name, 0).delete(libvirt.VIR_DOMAIN_SNAPSHOT_DELETE_METADATA_ONLY)
        except libvirt.libvirtError as err:
            if err.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN_SNAPSHOT:
                raise


def domains_using(conn: Any, skip: tuple[str, str] | None = None) -> list[tuple[str, str, list[str]]]:
    """(domain, disk target, files) for every disk of every domain: its source and written chain.

    ``skip`` is a (domain name, target) pair left out: the root disk whose users are sought.
    """
    found = []
    for domain in conn.listAllDomains(0):
        try:
            definitions = [inactive_xml(domain)] if domain.isPersistent() else []
            if is_active(domain):
                definitions.append(live_xml(domain))
            name = domain.name()
        except libvirt.libvirtError:
            continue  # gone since the listing
        for xml in definitions:
            for disk in xml.findall("./devices/disk"):
                target = disk.find("target")
                dev = target.get("dev", "") if target is not None else ""
                if skip is not None and (name, dev) == skip:
                    continue
                files = [path for path, _ in dx.chain(disk) if path]
                if files:
                    found.append((name, dev, files))
    return found


def refuse_invalid_definition(conn: Any, instance: str, xml: ET.Element, new_disk: ET.Element) -> None:
    """Ask libvirt, before anything changes, whether it would accept the new disk's definition.

    ``domainXMLToNative`` parses and validates a definition as ``define`` does, without defining or
    starting anything. Only a refusal of the new definition where the current one passes counts: the
    conversion itself may not know every device a host uses.
    """
    if conn.getType() != "QEMU":
        return
    try:
        conn.domainXMLToNative("qemu-argv", dx.to_string(xml), 0)
    except libvirt.libvirtError:
        return
    try:
        conn.domainXMLToNative("qemu-argv", dx.to_string(dx.with_disk(xml, new_disk)), 0)
    except libvirt.libvirtError as err:
        raise UnsupportedInstance(
            f"instance {instance!r}: libvirt would refuse its root disk as a qcow2 overlay: "
            f"{err.get_error_message()}"
        ) from None


def update_disk(conn: Any, domain: Any, xml: ET.Element, disk: ET.Element) -> None:
    """Change one disk of the persistent definition, and nothing else of it.

    ``updateDeviceFlags`` on the config replaces that disk as libvirt parsed it; drivers without it
    (the test driver) get the whole definition with the disk replaced.
    """
    try:
        domain.updateDeviceFlags(dx.to_string(disk), libvirt.VIR_DOMAIN_AFFECT_CONFIG)
    except libvirt.libvirtError as err:
        if err.get_error_code() != libvirt.VIR_ERR_NO_SUPPORT:
            raise
        conn.defineXML(dx.to_string(dx.with_disk(xml, disk)))
