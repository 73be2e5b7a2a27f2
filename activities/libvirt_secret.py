"""libvirt secrets: the value a disk's ``<auth><secret>`` names, read as QEMU would get it.

A disk names its secret by UUID or by usage; a secret that does not exist, or whose value cannot be
read (defined ``private='yes'``), is an error that names it and why.
"""

from __future__ import annotations

import libvirt

from activities import libvirt_domain as ld


class SecretUnreadable(Exception):
    """The secret is missing or its value cannot be read; the message says which."""


def ceph_secret_value(conn: ld.Libvirt, uuid: str | None, usage: str | None) -> bytes:
    """The value of the ``ceph`` secret named by ``uuid`` (else by ``usage``)."""
    which = f"uuid {uuid}" if uuid else f"usage {usage!r}"
    try:
        if uuid:
            secret = conn.connection().secretLookupByUUIDString(uuid)
        else:
            secret = conn.connection().secretLookupByUsage(libvirt.VIR_SECRET_USAGE_TYPE_CEPH, usage)
    except libvirt.libvirtError:
        raise SecretUnreadable(f"the libvirt secret ({which}) does not exist (virsh secret-list)") from None
    try:
        return bytes(secret.value(0))
    except libvirt.libvirtError as err:
        raise SecretUnreadable(
            f"the value of the libvirt secret ({which}) cannot be read: {err.get_error_message()} "
            "(a secret defined private='yes' cannot be read)"
        ) from None
