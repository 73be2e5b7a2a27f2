"""An instance's state in a fleet, on its own: ``rebuild fleet status --state`` declares its option with
it, and the CLI builds its commands without loading pydantic or the fleet's models."""

from __future__ import annotations

from enum import StrEnum


class InstanceState(StrEnum):
    """An instance's state in a fleet; one name everywhere (query, CLI, API)."""

    WAITING = "waiting"
    RUNNING = "running"
    REBUILT = "rebuilt"
    ROLLED_BACK = "rolled-back"
    FAILED = "failed"
    SKIPPED = "skipped"
    ABORTED = "aborted"
