"""How every client and worker reaches Temporal: one place, one data converter.

The worker and the operator's tools (CLI, HTTP API) both use this module and neither imports the other.
"""

from __future__ import annotations

import os
import re
import socket

from temporalio.client import Client
from temporalio.envconfig import ClientConfig
from temporalio.runtime import Runtime

from common.codec import data_converter

DEFAULT_ADDRESS = "localhost:7233"


class TemporalUnavailable(Exception):
    """The Temporal server could not be reached at the configured address."""


async def connect(
    address: str | None = None, namespace: str | None = None, runtime: Runtime | None = None
) -> Client:
    """Connect using ``temporalio.envconfig`` (``TEMPORAL_ADDRESS``, profiles), then overrides."""
    config = ClientConfig.load_client_connect_config()
    config.setdefault("target_host", DEFAULT_ADDRESS)
    if address:
        config["target_host"] = address
    if namespace:
        config["namespace"] = namespace
    try:
        return await Client.connect(**config, data_converter=data_converter(), runtime=runtime)
    except RuntimeError as err:
        raise TemporalUnavailable(f"cannot reach Temporal at {config['target_host']}: {err}") from None


_IDENTITY_HOST = re.compile(r"\bhost=(\S+)")


def worker_identity(host: str) -> str:
    """How a worker names itself to Temporal: the hypervisor it serves, so clients can list hosts."""
    return f"{os.getpid()}@{socket.gethostname()} host={host}"


def identity_host(identity: str) -> str | None:
    """The hypervisor a poller serves, from its :func:`worker_identity`; None for other pollers."""
    found = _IDENTITY_HOST.search(identity)
    return found.group(1) if found else None
