"""The base of every model that crosses the Temporal boundary, and the two rules it keeps.

Each workflow and activity takes one model and returns one, so a field can be added later without
breaking a workflow that is already running. Two rules keep mixed worker versions and replays working
(see docs/operations.md, Versioning):

- what crosses Temporal ignores fields it does not know, so a newer client or worker never stops an
  older one's workflow task;
- what crosses Temporal is not validated beyond its types: a validator tightened later would fail the
  replay of a workflow that started under the old one. Checks belong at the edges, where a person or a
  service asks for something: the ``Strict*`` models, built by the CLI and the HTTP API.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Wire(BaseModel):
    """A model that crosses Temporal: fields it does not know (from a newer version) are ignored."""

    model_config = ConfigDict(extra="ignore", frozen=True)
