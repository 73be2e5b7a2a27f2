"""The checks the edges make (the CLI, the HTTP API) before anything crosses Temporal.

The wire models carry none of these, so a check tightened later never fails the replay of a workflow
that an older check let through; the ``Strict*`` models use them as field types.
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator

__all__ = [
    "DISK_TARGET",
    "GLANCE_IMAGE_ID",
    "HOST_NAME",
    "INSTANCE_NAME",
    "MAX_REQUESTED_BY",
    "REQUESTED_BY",
    "SHA256_HEX",
    "SHA512_HEX",
    "HostName",
    "InstanceName",
    "RequestedBy",
    "check_host_name",
    "check_instance_name",
    "check_requested_by",
]  # fmt: skip


SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
SHA512_HEX = re.compile(r"^[0-9a-f]{128}$")
GLANCE_IMAGE_ID = re.compile(r"^[0-9a-fA-F-]{32,36}$")
# libvirt accepts almost anything as a domain name; we refuse what cannot be part of a workflow ID
# or a file name without quoting.
INSTANCE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+:-]{0,199}$")
HOST_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
# A disk's target device as libvirt names it: vda, sdb, hdc, xvda, ...
DISK_TARGET = re.compile(r"^[a-z][a-z0-9]{1,31}$")
# Who asked for a rebuild or a decision: shown in the Web UI and kept in every history, so bounded at
# the edges (CLI, API); the wire models stay lenient, so running workflows always replay.
MAX_REQUESTED_BY = 200


# Shown in the Web UI as markdown: letters, digits and what names and e-mail addresses need, with
# "name (for someone)" as the API writes it; nothing that makes a link, an image or HTML.
REQUESTED_BY = re.compile(r"[A-Za-z0-9][A-Za-z0-9 _.,@:+=()/-]*")


def check_requested_by(value: str) -> str:
    if not 1 <= len(value) <= MAX_REQUESTED_BY:
        raise ValueError(f"requested_by must have 1 to {MAX_REQUESTED_BY} characters, not {len(value)}")
    if not REQUESTED_BY.fullmatch(value):
        raise ValueError(
            "requested_by may hold letters, digits, spaces and _ . , @ : + = ( ) / - only "
            f"(starting with a letter or digit), not {value[:40]!r}"
        )
    return value


def check_instance_name(value: str) -> str:
    if not INSTANCE_NAME.fullmatch(value):
        raise ValueError(f"not a usable instance name: {value!r}")
    return value


def check_host_name(value: str) -> str:
    if not HOST_NAME.fullmatch(value):
        raise ValueError(f"not a usable host name: {value!r}")
    return value


InstanceName = Annotated[str, AfterValidator(check_instance_name)]
HostName = Annotated[str, AfterValidator(check_host_name)]
RequestedBy = Annotated[str, AfterValidator(check_requested_by)]
