"""libvirt's console streams, and the event loop they need: a guest's serial output, read as it comes."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from typing import Any

import libvirt

from activities.errors import ConsoleBusy

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


class ConsoleStream:
    """The domain's first serial console, read through libvirt's stream (works for ``pty`` consoles).

    Opened without FORCE: forcing would kick an operator off the console. When another client holds
    it, ``ConsoleBusy`` says so (the check's own streams are closed when the check ends, and libvirt
    drops those of a dead worker's connection).
    """

    def __init__(self, domain: Any, translate: Callable[[libvirt.libvirtError, str], Exception]) -> None:
        self._name = domain.name()
        self._translate = translate
        self._stream = domain.connect().newStream(libvirt.VIR_STREAM_NONBLOCK)
        try:
            domain.openConsole(None, self._stream, 0)
        except libvirt.libvirtError as err:
            with contextlib.suppress(libvirt.libvirtError):
                self._stream.abort()
            if "active console session" in (err.get_error_message() or "").lower():
                raise ConsoleBusy(
                    f"the serial console of {self._name!r} is held by another client (an operator's "
                    "virsh console?): the boot check reads it but never forces it away; close that "
                    "session, or verify by agent or a file console"
                ) from None
            raise

    def read(self) -> bytes | None:
        """What arrived since the last read (b"" when nothing did); None once the console closed."""
        try:
            data = self._stream.recv(64 << 10)
        except libvirt.libvirtError as err:
            raise self._translate(err, self._name) from None
        if data == -2:
            return b""
        return bytes(data) or None

    def close(self) -> None:
        with contextlib.suppress(libvirt.libvirtError):
            self._stream.abort()
