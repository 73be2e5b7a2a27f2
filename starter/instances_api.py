"""The instances endpoint of the HTTP API: ``rebuild instances`` (``starter/instances.py``).

| method and path | does | answers |
| --- | --- | --- |
| ``GET /v1/instances?host=H&host=...`` | every host's instances and their last rebuild | 200, 400, 403 |

A client sees the hosts and instances of its scope only; a host it names outside that scope is 403.
"""

from __future__ import annotations

from aiohttp import web

from starter.api_clients import Forbidden
from starter.http_kit import CLIENT, caller, reply
from starter.instances import InstancesReport, list_instances
from starter.openapi import Op, Param, route
from starter.rebuilds import hosts_with_workers


async def index(request: web.Request) -> web.Response:
    who = caller(request)
    named = request.query.getall("host", [])
    for host in named:
        if not who.may_reach_host(host):
            raise Forbidden(f"client {who.name} may not see host {host}")
    client = request.app[CLIENT]
    asked = named or [h for h in await hosts_with_workers(client) if who.may_reach_host(h)]
    if not asked:
        return reply(InstancesReport(instances=[], hosts=[]))
    report = await list_instances(client, asked)
    shown = [row for row in report.instances if who.may_reach(row.host, row.instance)]
    return reply(InstancesReport(instances=shown, hosts=report.hosts))


def add_instance_routes(app: web.Application) -> None:
    route(
        app,
        "GET",
        "/v1/instances",
        index,
        Op(
            "listInstances",
            "instances",
            "Every host's instances, as each host's worker lists them",
            200,
            InstancesReport,
            errors=(400, 403),
            query=(Param("host", description="ask only this host (repeatable); default: every host"),),
        ),
    )
