"""A thin, typed layer over libvirt: one connection per worker, a ``Domain`` per instance, errors
translated once, here (as Nova's ``Guest`` wraps a domain).

The domain XML is the source of truth for disk paths and formats; ``activities.domain_xml`` reads and
edits it, and changes reach libvirt only through this module. Every call blocks: run it in a thread.
"""

from __future__ import annotations

import contextlib
import json
import threading
import xml.etree.ElementTree as ET
from collections.abc import Callable
from typing import Any, Literal, TypeVar

import libvirt
import libvirt_qemu

from activities import domain_xml as dx
from activities.errors import (
    DefinitionRefused,
    HypervisorError,
    HypervisorUnavailable,
    InstanceNotFound,
    InstanceStartFailed,
    UnsupportedInstance,
)
from activities.libvirt_console import ConsoleStream, ensure_event_loop

T = TypeVar("T")
# virsh's words for libvirt's domain states.
_STATE_WORDS = {
    libvirt.VIR_DOMAIN_NOSTATE: "no state",
    libvirt.VIR_DOMAIN_RUNNING: "running",
    libvirt.VIR_DOMAIN_BLOCKED: "idle",
    libvirt.VIR_DOMAIN_PAUSED: "paused",
    libvirt.VIR_DOMAIN_SHUTDOWN: "in shutdown",
    libvirt.VIR_DOMAIN_SHUTOFF: "shut off",
    libvirt.VIR_DOMAIN_CRASHED: "crashed",
    libvirt.VIR_DOMAIN_PMSUSPENDED: "pmsuspended",
}
PowerState = Literal["off", "running", "crashed"]

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
_PAUSE_REASONS = {
    libvirt.VIR_DOMAIN_PAUSED_USER: " (by a user)",
    libvirt.VIR_DOMAIN_PAUSED_IOERROR: " (on an I/O error)",
    libvirt.VIR_DOMAIN_PAUSED_MIGRATION: " (migrating)",
    libvirt.VIR_DOMAIN_PAUSED_SNAPSHOT: " (taking a snapshot)",
    libvirt.VIR_DOMAIN_PAUSED_WATCHDOG: " (by its watchdog)",
}
# Queries some drivers lack (the test driver has no jobs): their absence means "none".
_UNSUPPORTED = (libvirt.VIR_ERR_NO_SUPPORT, libvirt.VIR_ERR_OPERATION_INVALID)


def _silence_libvirt(_ctx: object, _err: object) -> None:
    """libvirt prints every error to stderr unless a handler is set; we report them ourselves."""


libvirt.registerErrorHandler(_silence_libvirt, None)


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


def _optional(call: Callable[[], T], unsupported: T) -> T:
    try:
        return call()
    except libvirt.libvirtError as err:
        if err.get_error_code() in _UNSUPPORTED:
            return unsupported
        raise


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

    def domain(self, name: str) -> Domain:
        return Domain(self, name)

    def with_domain(self, instance: str, action: Callable[[Any], T]) -> T:
        """Run ``action`` on libvirt's domain object, with libvirt's errors translated."""
        try:
            domain = self.connection().lookupByName(instance)
            return action(domain)
        except libvirt.libvirtError as err:
            raise translate(err, instance) from None

    def domain_names(self) -> list[str]:
        try:
            return sorted(d.name() for d in self.connection().listAllDomains(0))
        except libvirt.libvirtError as err:
            raise translate(err, "*") from None

    def create_transient(self, instance: str, definition: str) -> None:
        try:
            self.connection().createXML(definition, 0)
        except libvirt.libvirtError as err:
            raise translate(err, instance) from None

    def disk_users(self, skip: tuple[str, str] | None = None) -> list[tuple[str, str, list[str]]]:
        """(domain, disk target, files) for every disk of every domain: its source and written chain,
        in the persistent and the running definition. ``skip``: a (domain, target) pair left out."""
        found = []
        for name in self.domain_names():
            try:
                definitions = self.domain(name).definitions()
            except InstanceNotFound:
                continue  # gone since the listing
            for xml in definitions:
                for disk in xml.findall("./devices/disk"):
                    target = disk.find("target")
                    dev = target.get("dev", "") if target is not None else ""
                    files = [path for path, _ in dx.chain(disk) if path]
                    if files and (name, dev) != skip:
                        found.append((name, dev, files))
        return found

    def refuse_invalid_disk(self, instance: str, xml: ET.Element, new_disk: ET.Element) -> None:
        """Ask libvirt, before anything changes, whether it would accept the new disk's definition.

        ``domainXMLToNative`` parses and validates a definition as ``define`` does, without defining or
        starting anything. Only a refusal of the new definition where the current one passes counts:
        the conversion itself may not know every device a host uses.
        """
        conn = self.connection()
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


class Domain:
    """An instance's domain: what the activities ask of libvirt about it, each call translated."""

    def __init__(self, libvirt_conn: Libvirt, name: str) -> None:
        self.libvirt = libvirt_conn
        self.name = name

    def _call(self, action: Callable[[Any], T]) -> T:
        return self.libvirt.with_domain(self.name, action)

    # -- what it is --

    def definition(self) -> ET.Element:
        """The persistent definition: what the next start will use, and what we change."""
        flags = libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE
        return dx.parse(self._call(lambda d: d.XMLDesc(flags)))

    def live_definition(self) -> ET.Element:
        """What runs now: for a running domain, the disks' backing chains as QEMU opened them."""
        return dx.parse(self._call(lambda d: d.XMLDesc(0)))

    def definitions(self) -> list[ET.Element]:
        """The persistent definition (if any) and, while it runs, the live one."""
        persistent, active = self._call(lambda d: (d.isPersistent(), d.isActive()))
        found = []
        if persistent:
            found.append(self.definition())
        if active:
            found.append(self.live_definition())
        return found

    def uuid(self) -> str:
        return str(self._call(lambda d: d.UUIDString()))

    def is_active(self) -> bool:
        return bool(self._call(lambda d: d.isActive()))

    def run_id(self) -> int | None:
        """libvirt's ID of the running domain: a new one at every start; None while it is off."""
        found = int(self._call(lambda d: d.ID()))
        return found if found >= 0 else None

    def is_persistent(self) -> bool:
        return bool(self._call(lambda d: d.isPersistent()))

    def state(self) -> tuple[int, int]:
        state, reason = self._call(lambda d: d.state())
        return int(state), int(reason)

    def state_word(self) -> str:
        """The domain's state in virsh's words (``virsh domstate``): running, paused, shut off, ..."""
        state, _ = self.state()
        return _STATE_WORDS.get(state, f"state {state}")

    def frozen(self) -> str | None:
        """Why the guest can neither run on nor shut down now: paused, or suspended by itself."""
        state, reason = self.state()
        if state == libvirt.VIR_DOMAIN_PMSUSPENDED:
            return "suspended by its guest (S3/S4)"
        if state == libvirt.VIR_DOMAIN_PAUSED:
            return "paused" + _PAUSE_REASONS.get(reason, "")
        return None

    def power_state(self) -> PowerState:
        if not self.is_active():
            return "off"
        return "crashed" if self.state()[0] == libvirt.VIR_DOMAIN_CRASHED else "running"

    def has_managed_save(self) -> bool:
        return bool(self._call(lambda d: d.hasManagedSaveImage(0)))

    def snapshot_names(self) -> list[str]:
        snapshots: list[Any] = self._call(lambda d: _optional(lambda: d.listAllSnapshots(0), []))
        return sorted(s.getName() for s in snapshots)

    def checkpoints(self) -> dict[str, ET.Element]:
        listed: list[Any] = self._call(lambda d: _optional(lambda: d.listAllCheckpoints(0), []))
        return {c.getName(): dx.parse(c.getXMLDesc(0)) for c in listed}

    def has_block_job(self, target: str) -> bool:
        return bool(self._call(lambda d: _optional(lambda: d.blockJobInfo(target, 0), {})))

    def has_job(self) -> bool:
        job = self._call(lambda d: _optional(lambda: d.jobInfo(), [libvirt.VIR_DOMAIN_JOB_NONE]))
        return bool(job) and job[0] != libvirt.VIR_DOMAIN_JOB_NONE

    def image_record(self) -> ET.Element | None:
        """The image a rebuild recorded in the domain's metadata, if any."""

        def read(domain: Any) -> str | None:
            try:
                return str(domain.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, dx.IMAGE_NAMESPACE, 0))
            except libvirt.libvirtError as err:
                if err.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN_METADATA:
                    return None
                raise

        raw = self._call(read)
        return dx.parse(raw) if raw is not None else None

    # -- power --

    def start(self) -> bool:
        """Start the domain; True when it was running already."""

        def create(domain: Any) -> bool:
            if domain.isActive():
                return True
            try:
                domain.create()
            except libvirt.libvirtError as err:
                if domain.isActive():
                    return True
                raise InstanceStartFailed(
                    f"libvirt could not start {self.name!r}: {err.get_error_message()}"
                ) from None
            return False

        return self._call(create)

    def force_off(self) -> None:
        def destroy(domain: Any) -> None:
            try:
                domain.destroy()
            except libvirt.libvirtError:
                if domain.isActive():
                    raise

        self._call(destroy)

    def press_power_button(self) -> None:
        """ACPI only: libvirt's default would pick the guest agent first where one is configured."""

        def press(domain: Any) -> None:
            try:
                domain.shutdownFlags(libvirt.VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN)
            except libvirt.libvirtError as err:
                if not domain.isActive():
                    return
                if err.get_error_code() not in (libvirt.VIR_ERR_INVALID_ARG, libvirt.VIR_ERR_NO_SUPPORT):
                    raise
                # A driver without the ACPI flag (libvirt's test driver) takes a plain shutdown request.
                domain.shutdown()

        self._call(press)

    def ask_agent_to_shut_down(self) -> bool:
        """``guest-shutdown`` through the agent, when the domain has one that answers; True when asked."""
        if not dx.has_agent_channel(self.definition()):
            return False

        def ask(domain: Any) -> bool:
            try:
                call_agent(domain, "guest-ping", 2)
                domain.shutdownFlags(libvirt.VIR_DOMAIN_SHUTDOWN_GUEST_AGENT)
            except libvirt.libvirtError:
                # No agent, or it went away because the guest is already going down.
                return False
            return True

        return self._call(ask)

    # -- the guest --

    def agent_command(self, command: str, timeout_seconds: int) -> Any:
        """One guest agent command; the agent's ``return`` value. Raises libvirtError when it does not
        answer (callers that wait for an agent catch it)."""
        return self._call(lambda d: call_agent(d, command, timeout_seconds))

    def agent_osinfo(self, timeout_seconds: int) -> str | None:
        """The guest's OS as its agent reports it, or None while the agent does not answer."""

        def ask(domain: Any) -> str | None:
            try:
                call_agent(domain, "guest-ping", timeout_seconds)
                info = call_agent(domain, "guest-get-osinfo", timeout_seconds)
            except libvirt.libvirtError:
                return None
            name = info.get("pretty-name") if isinstance(info, dict) else None
            return f"guest agent answers: {name or 'unknown OS'}"

        return self._call(ask)

    def console(self) -> ConsoleStream:
        return self._call(lambda d: ConsoleStream(d, translate))

    # -- its definition --

    def record_image(self, attributes: dict[str, str]) -> None:
        """Write the new image into the domain's metadata, where the next rebuild and operators see it."""

        def write(domain: Any) -> None:
            live = libvirt.VIR_DOMAIN_AFFECT_LIVE if domain.isActive() else 0
            domain.setMetadata(
                libvirt.VIR_DOMAIN_METADATA_ELEMENT,
                dx.image_record(attributes),
                dx.IMAGE_PREFIX,
                dx.IMAGE_NAMESPACE,
                libvirt.VIR_DOMAIN_AFFECT_CONFIG | live,
            )

        self._call(write)

    def define(self, definition: str) -> None:
        self._call(lambda d: d.connect().defineXML(definition))

    def update_disk(self, xml: ET.Element, disk: ET.Element) -> None:
        """Change one disk of the persistent definition, and nothing else of it.

        ``updateDeviceFlags`` on the config replaces that disk as libvirt parsed it; drivers without it
        (the test driver) get the whole definition with the disk replaced.
        """

        def update(domain: Any) -> None:
            try:
                domain.updateDeviceFlags(dx.to_string(disk), libvirt.VIR_DOMAIN_AFFECT_CONFIG)
            except libvirt.libvirtError as err:
                if err.get_error_code() != libvirt.VIR_ERR_NO_SUPPORT:
                    raise
                domain.connect().defineXML(dx.to_string(dx.with_disk(xml, disk)))

        self._call(update)

    def drop_snapshot_metadata(self, names: list[str]) -> None:
        """Forget these snapshots in libvirt (their data went with the old disk); gone ones are fine."""

        def drop(domain: Any) -> None:
            for name in names:
                try:
                    snapshot = domain.snapshotLookupByName(name, 0)
                    snapshot.delete(libvirt.VIR_DOMAIN_SNAPSHOT_DELETE_METADATA_ONLY)
                except libvirt.libvirtError as err:
                    if err.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN_SNAPSHOT:
                        raise

        self._call(drop)

    def remove(self) -> None:
        """Destroy and undefine (a transient domain goes with its destroy); gone already is fine."""

        def remove(domain: Any) -> None:
            if domain.isActive():
                domain.destroy()
            if domain.isPersistent():
                domain.undefine()

        with contextlib.suppress(InstanceNotFound):
            self._call(remove)


def call_agent(domain: Any, command: str, timeout_seconds: int) -> Any:
    answer = libvirt_qemu.qemuAgentCommand(domain, json.dumps({"execute": command}), timeout_seconds, 0)
    return json.loads(answer).get("return") if answer else None
