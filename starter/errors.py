"""What the service layer refuses, as data: each edge says it in its own words.

``starter/rebuilds.py`` and ``starter/fleets.py`` raise these. A refusal's kind decides the CLI's exit
code and the HTTP status; its message names what was refused and why, and nothing of either edge (no
option, no command, no URL). Where more helps (what to look at, which input is likely wrong),
:meth:`ServiceError.said_with` adds it in the edge's :class:`Words`: ``starter/cli_context.py`` points
at a command, ``starter/http_kit.py`` at a resource's path.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from pydantic import ValidationError

from workflows.fleet_models import fleet_workflow_id
from workflows.models import host_task_queue, rebuild_workflow_id


@dataclass(frozen=True)
class Words:
    """How one edge names things: an input of the request, and where a rebuild or a fleet is shown."""

    field: Callable[[str], str]
    rebuild: Callable[[str, str], str]  # (host, instance)
    fleet: Callable[[str], str]


class ServiceError(Exception):
    """A refusal; its kind (the subclasses below) decides the exit code and the HTTP status."""

    def said_with(self, words: Words) -> str:
        return str(self)


class BadRequest(ServiceError):
    """The request cannot be done as asked: exit 2, HTTP 400."""


class NotFound(ServiceError):
    """The rebuild or fleet it names is not known: exit 2, HTTP 404."""


class Conflict(ServiceError):
    """It clashes with what runs (or does not run) now: exit 2, HTTP 409."""


class _About(ServiceError):
    """A refusal about one rebuild or one fleet; each kind ``says`` it from the names.

    One that clashes with what runs (``points``) points at it, at the place each edge shows it.
    """

    template: ClassVar[str] = "{workflow_id}"
    points: ClassVar[bool] = False

    def __init_subclass__(cls, says: str | None = None, points: bool = False, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if says is not None:
            cls.template, cls.points = says, points

    def __init__(self, workflow_id: str, shown_at: Callable[[Words], str], **names: str) -> None:
        self.workflow_id, self._shown_at = workflow_id, shown_at
        super().__init__(self.template.format(workflow_id=workflow_id, **names))

    def said_with(self, words: Words) -> str:
        return f"{self}; see: {self._shown_at(words)}" if self.points else str(self)


class _AboutRebuild(_About):
    def __init__(self, instance: str, host: str) -> None:
        self.instance, self.host = instance, host
        workflow_id = rebuild_workflow_id(host, instance)
        super().__init__(
            workflow_id, lambda words: words.rebuild(host, instance), instance=instance, host=host
        )


class RebuildAlreadyRunning(
    _AboutRebuild,
    Conflict,
    points=True,
    says="a rebuild of {instance} on {host} is already running (workflow {workflow_id})",
): ...


class UnknownRebuild(_AboutRebuild, NotFound, says="no rebuild of {instance} on {host} is known"): ...


class RebuildNotRunning(_AboutRebuild, Conflict, says="no rebuild of {instance} on {host} is running"): ...


class _AboutFleet(_About):
    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(fleet_workflow_id(name), lambda words: words.fleet(name), name=name)


class FleetAlreadyRunning(
    _AboutFleet, Conflict, points=True, says="fleet {name} is already running (workflow {workflow_id})"
): ...


class UnknownFleet(_AboutFleet, NotFound, says="no fleet named {name} is known"): ...


class FleetNotRunning(_AboutFleet, Conflict, says="fleet {name} is not running"): ...


class NoWorkerOnHost(BadRequest):
    """Nobody polls the host's queue: the rebuild would wait, scheduled, with nobody to run it."""

    def __init__(self, host: str, hosts_with_workers: list[str]) -> None:
        self.host, self.queue = host, host_task_queue(host)
        self.hosts_with_workers = hosts_with_workers
        self.known = ", ".join(hosts_with_workers) if hosts_with_workers else "none"
        super().__init__(f"no worker polls {self.queue}; hosts with a worker: {self.known}")

    def said_with(self, words: Words) -> str:
        # A mistyped host is the likely cause: the edge names the input the way its caller gave it.
        hint = f"is {words.field('host')} right?"
        return f"no worker polls {self.queue} ({hint}); hosts with a worker: {self.known}"


class BadFilter(BadRequest):
    def __init__(self, value: str) -> None:
        self.value = value
        super().__init__(f"not a usable filter value: {value!r}")


# A field named inside a validator's message: `image_url`. Each edge says it in its own words.
_NAMED_FIELD = re.compile(r"`([a-z][a-z0-9_]*)`")


def validation_problems(exc: ValidationError, field: Callable[[str], str] | None = None) -> str:
    """One line naming each bad field and why, for operators and API callers alike.

    Without ``field``, fields are named as the request spells them (``identity.hostname``); with it
    (an edge's :attr:`Words.field`), each by the edge's own name for it: the CLI's option.
    """

    def problem(error: Any) -> str:
        loc = [str(part) for part in error["loc"] if isinstance(part, str)]
        message = str(error["msg"]).removeprefix("Value error, ")
        if field is None:
            where = ".".join(map(str, error["loc"]))
            return f"{where}: {message}" if where else message
        message = _NAMED_FIELD.sub(lambda named: field(named[1]), message)
        return f"{field(loc[-1])}: {message}" if loc else message

    return "; ".join(problem(error) for error in exc.errors())


class InstanceOnNoHost(BadRequest):
    """No host asked lists the instance: a mistyped name, or its host's worker did not answer."""

    def __init__(self, instance: str, asked: list[str], silent: list[str]) -> None:
        self.instance, self.asked, self.silent = instance, asked, silent
        hosts = ", ".join(asked) if asked else "none (no host has a worker)"
        quiet = f"; no worker answered on {', '.join(silent)}" if silent else ""
        super().__init__(f"no host has an instance named {instance!r}; hosts asked: {hosts}{quiet}")

    def said_with(self, words: Words) -> str:
        return f"{self}; name its host with {words.field('host')} if it is on another"


class _OnManyHosts(BadRequest):
    """Which of several hosts is meant cannot be guessed: the caller names one."""

    says: ClassVar[str]

    def __init__(self, instance: str, hosts: list[str]) -> None:
        self.instance, self.hosts = instance, hosts
        super().__init__(self.says.format(instance=instance, hosts=", ".join(hosts)))

    def said_with(self, words: Words) -> str:
        return f"{self}; name one with {words.field('host')}"


class InstanceOnManyHosts(_OnManyHosts):
    """The instance's name is defined on more than one host."""

    says = "instance {instance!r} is on several hosts: {hosts}"


class RebuildOnManyHosts(_OnManyHosts):
    """Rebuilds of an instance of this name ran on more than one host, none of them running now."""

    says = "rebuilds of {instance!r} are known on several hosts: {hosts}"


class NoRebuildOfInstance(NotFound):
    """No host has a rebuild of the instance in Temporal's visibility."""

    def __init__(self, instance: str) -> None:
        self.instance = instance
        super().__init__(f"no rebuild of {instance} is known on any host")

    def said_with(self, words: Words) -> str:
        return f"{self}; name its host with {words.field('host')} if it was just started"
