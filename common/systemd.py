"""systemd's readiness protocol (sd_notify(3)): one datagram to ``$NOTIFY_SOCKET``.

With ``Type=notify`` a unit is started only once its process says ``READY=1``, so ``systemctl start``
returns when the worker polls, and a unit ordered after it starts then. Outside systemd the
variable is unset and nothing is sent.
"""

from __future__ import annotations

import os
import socket


def notify(*assignments: str) -> bool:
    """Send ``READY=1``, ``STATUS=...`` and the like; False where no one listens."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # an abstract socket
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall("\n".join(assignments).encode())
    except OSError:
        return False
    return True
