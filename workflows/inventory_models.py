"""What crosses Temporal for ``rebuild instances``: which hosts to ask, and what each one answered.

The ``InstanceInventory`` workflow owns these models. Wire models (``workflows/wire.py``).
"""

from __future__ import annotations

from pydantic import Field

from workflows.activity_models import InventoryEntry
from workflows.names import DEFAULT_ANSWER_WITHIN_SECONDS
from workflows.wire import Wire

__all__ = ["DEFAULT_ANSWER_WITHIN_SECONDS"]

INVENTORY_WORKFLOW = "InstanceInventory"
# A live worker takes a listing within milliseconds; one not taken in this time has no worker.


class InventoryRequest(Wire):
    hosts: list[str]
    # fnmatch pattern on instance names (an instance's exact name finds it); None lists every one.
    name_pattern: str | None = None
    answer_within_seconds: float = DEFAULT_ANSWER_WITHIN_SECONDS


class HostListing(Wire):
    host: str
    instances: list[InventoryEntry] = Field(default_factory=list)
    # Why the host gave no listing: no worker took it in time, or the listing failed.
    error: str | None = None


class InventoryReport(Wire):
    hosts: list[HostListing]
