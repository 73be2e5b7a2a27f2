"""A rebuild's ``RebuildResult`` from the failure it ended with: one decoder for every reader.

A rebuild that fails (rolled back, or nothing changed) raises an ``ApplicationError`` whose first detail
is its ``RebuildResult``, so the caller learns what happened to the instance, not only that it failed.
The CLI's ``start --wait``, the status of a finished rebuild and the fleet counting its children all
read it back the same way. Pure: safe inside the workflow sandbox.
"""

from __future__ import annotations

from pydantic import ValidationError
from temporalio.exceptions import ApplicationError

from workflows.models import RebuildResult


def failure_result(cause: BaseException | None) -> RebuildResult | None:
    """The result a failed rebuild carried; None for a failure without one (terminated, cancelled,
    timed out, or a failure from before results were attached)."""
    if not isinstance(cause, ApplicationError) or not cause.details:
        return None
    try:
        return RebuildResult.model_validate(cause.details[0])
    except ValidationError:
        return None
