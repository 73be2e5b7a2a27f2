"""Which instances each host has, and which host has an instance: ``rebuild instances``, and the
host of a command that was given none.

The hosts are those whose worker polls Temporal now (they name themselves in their identity, see
``rebuilds.hosts_with_workers``): Temporal already knows who polls, so nothing else has to be kept in
step with the workers. Each host's own worker lists its instances (``InstanceInventory``), all hosts at
once; a host whose worker is gone is reported within seconds as not answering. The last rebuild of each
instance comes from Temporal's visibility, not from the hosts.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime, timedelta

from pydantic import BaseModel
from temporalio.client import Client, WorkflowExecution

from starter.errors import (
    BadFilter,
    InstanceOnManyHosts,
    InstanceOnNoHost,
    NoRebuildOfInstance,
    RebuildOnManyHosts,
)
from starter.rebuilds import hosts_with_workers
from workflows import search_attributes as sa
from workflows.activity_models import InventoryEntry
from workflows.checks import HOST_NAME, INSTANCE_NAME
from workflows.inventory_models import (
    DEFAULT_ANSWER_WITHIN_SECONDS,
    INVENTORY_WORKFLOW,
    HostListing,
    InventoryReport,
    InventoryRequest,
)
from workflows.models import WORKFLOW_NAME, WORKFLOW_TASK_QUEUE

# Rebuilds read from visibility for one listing at most: the newest of each instance is among them.
MAX_REBUILDS_READ = 2000
NO_WORKFLOW_WORKER = "no worker answered: none polls the shared workflow queue"


class LastRebuild(BaseModel):
    workflow_id: str
    # Temporal's word for the run (RUNNING, COMPLETED, FAILED, TERMINATED, ...) and the rebuild's phase.
    status: str
    phase: str | None
    started: datetime
    closed: datetime | None = None


class InstanceRow(BaseModel):
    host: str
    instance: str
    state: str | None
    running: bool
    root_disk: str | None
    # Why a rebuild would refuse it now (None: a rebuild accepts it).
    refusal: str | None = None
    image_url: str | None = None
    image_sha256: str | None = None
    last_rebuild: LastRebuild | None = None

    @property
    def rebuildable(self) -> bool:
        return self.refusal is None


class HostAnswer(BaseModel):
    host: str
    answered: bool
    error: str | None = None
    instances: int = 0


class InstancesReport(BaseModel):
    instances: list[InstanceRow]
    hosts: list[HostAnswer]

    @property
    def silent_hosts(self) -> list[str]:
        return [h.host for h in self.hosts if not h.answered]


async def list_instances(
    client: Client,
    hosts: Sequence[str] | None = None,
    name_pattern: str | None = None,
    answer_within: float = DEFAULT_ANSWER_WITHIN_SECONDS,
    with_last_rebuild: bool = True,
) -> InstancesReport:
    """Every instance of ``hosts`` (default: every host with a worker), as each host's worker lists it."""
    for host in hosts or ():
        if not HOST_NAME.fullmatch(host):
            raise BadFilter(host)
    inventory = await _inventory(client, hosts, name_pattern, answer_within)
    rows = [_row(listing.host, entry) for listing in inventory.hosts for entry in listing.instances]
    if with_last_rebuild and rows:
        last = await last_rebuilds(client, sorted({row.host for row in rows}))
        rows = [row.model_copy(update={"last_rebuild": last.get((row.host, row.instance))}) for row in rows]
    answers = [
        HostAnswer(
            host=listing.host,
            answered=listing.error is None,
            error=listing.error,
            instances=len(listing.instances),
        )
        for listing in inventory.hosts
    ]
    return InstancesReport(instances=rows, hosts=answers)


async def _inventory(
    client: Client, hosts: Sequence[str] | None, name_pattern: str | None, answer_within: float
) -> InventoryReport:
    serving = await hosts_with_workers(client)
    asked = list(dict.fromkeys(hosts)) if hosts else serving
    if not serving:
        # No worker runs workflows: the listing would wait for one. Every host is as good as silent.
        return InventoryReport(hosts=[HostListing(host=h, error=NO_WORKFLOW_WORKER) for h in asked])
    if not asked:
        return InventoryReport(hosts=[])
    report: InventoryReport = await client.execute_workflow(
        INVENTORY_WORKFLOW,
        InventoryRequest(hosts=asked, name_pattern=name_pattern, answer_within_seconds=answer_within),
        result_type=InventoryReport,
        id=f"instances:{uuid.uuid4().hex}",
        task_queue=WORKFLOW_TASK_QUEUE,
        execution_timeout=timedelta(seconds=answer_within + 60),
        static_summary=f"List the instances of {', '.join(asked)}",
    )
    return report


def _row(host: str, entry: InventoryEntry) -> InstanceRow:
    return InstanceRow(
        host=host,
        instance=entry.instance,
        state=entry.state or ("running" if entry.running else "shut off"),
        running=entry.running,
        root_disk=entry.root_disk,
        refusal=entry.refusal,
        image_url=entry.image_url,
        image_sha256=entry.image_sha256,
    )


async def last_rebuilds(
    client: Client, hosts: Sequence[str], instance: str | None = None
) -> dict[tuple[str, str], LastRebuild]:
    """The newest rebuild of each instance on ``hosts`` (by start time), from Temporal's visibility."""
    newest: dict[tuple[str, str], LastRebuild] = {}
    async for execution in client.list_workflows(_rebuilds_query(hosts, instance), limit=MAX_REBUILDS_READ):
        attributes = {pair.key.name: pair.value for pair in execution.typed_search_attributes}
        host, name = attributes.get(sa.HYPERVISOR_HOST.name), attributes.get(sa.INSTANCE_ID.name)
        if not isinstance(host, str) or not isinstance(name, str):
            continue
        seen = newest.get((host, name))
        if seen is None or execution.start_time > seen.started:
            newest[(host, name)] = _last_rebuild(execution, attributes.get(sa.REBUILD_PHASE.name))
    return newest


def _rebuilds_query(hosts: Sequence[str], instance: str | None) -> str:
    """Values are checked (host and instance names), never quoted."""
    clauses = [f"WorkflowType = '{WORKFLOW_NAME}'"]
    for host in hosts:
        if not HOST_NAME.fullmatch(host):
            raise BadFilter(host)
    if hosts:
        clauses.append("(" + " OR ".join(f"{sa.HYPERVISOR_HOST.name} = '{h}'" for h in hosts) + ")")
    if instance is not None:
        if not INSTANCE_NAME.fullmatch(instance):
            raise BadFilter(instance)
        clauses.append(f"{sa.INSTANCE_ID.name} = '{instance}'")
    return " AND ".join(clauses)


def _last_rebuild(execution: WorkflowExecution, phase: object) -> LastRebuild:
    return LastRebuild(
        workflow_id=execution.id,
        status=execution.status.name if execution.status else "UNKNOWN",
        phase=phase if isinstance(phase, str) else None,
        started=execution.start_time,
        closed=execution.close_time,
    )


class HostFound(BaseModel):
    """The one host that lists the instance, and the hosts that did not answer the question."""

    host: str
    silent: list[str] = []


async def host_of_instance(
    client: Client,
    instance: str,
    hosts: Sequence[str] | None = None,
    answer_within: float = DEFAULT_ANSWER_WITHIN_SECONDS,
) -> HostFound:
    """The host whose worker lists ``instance``; refused when none or several do.

    A host that did not answer is not counted (its worker is down: nothing could be done there now).
    """
    if not INSTANCE_NAME.fullmatch(instance):
        raise BadFilter(instance)
    report = await list_instances(client, hosts, instance, answer_within, with_last_rebuild=False)
    having = sorted({row.host for row in report.instances if row.instance == instance})
    if not having:
        raise InstanceOnNoHost(instance, [h.host for h in report.hosts], report.silent_hosts)
    if len(having) > 1:
        raise InstanceOnManyHosts(instance, having)
    return HostFound(host=having[0], silent=report.silent_hosts)


async def host_of_rebuild(client: Client, instance: str) -> str:
    """The host of the instance's rebuilds, from visibility: the one running one's, else the only one.

    For following and steering a rebuild (status, watch, abort, ...): it works while the host's worker
    is down, which is when an operator most wants the status.
    """
    rebuilds = await last_rebuilds(client, (), instance)
    running = sorted(host for (host, _), last in rebuilds.items() if last.status == "RUNNING")
    hosts = running or sorted(host for host, _ in rebuilds)
    if not hosts:
        raise NoRebuildOfInstance(instance)
    if len(hosts) > 1:
        raise RebuildOnManyHosts(instance, hosts)
    return hosts[0]
