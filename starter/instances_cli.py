"""``rebuild instances``: every host's instances, as each host's worker lists them, with their last rebuild.

Registered on the ``rebuild`` group by :func:`register`. The listing itself is ``starter/instances.py``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated
from urllib.parse import urlsplit

import typer
from rich.table import Table

from common.exit_codes import ExitCode
from starter.cli_context import AddressOption, Cli, JsonOption, command
from workflows.names import DEFAULT_ANSWER_WITHIN_SECONDS

if TYPE_CHECKING:  # temporalio and the models load when a command runs, not for every --help
    from temporalio.client import Client

    from starter.instances import InstanceRow, LastRebuild

# The phases a closed rebuild ends in: its outcome, in the words of `rebuild status`.
_FINAL_PHASES = frozenset({"done", "rolled-back", "failed"})


def register(app: typer.Typer) -> None:
    command(app, "instances")(instances)


def instances(
    ctx: typer.Context,
    host: Annotated[
        list[str] | None,
        typer.Option(
            metavar="HOST",
            help="Ask only this host's worker (repeatable); default: every host whose worker polls now.",
        ),
    ] = None,
    answer_within: Annotated[
        float,
        typer.Option(
            min=0.5,
            metavar="SECONDS",
            help="A host whose worker takes no listing in this time is reported as not answering.",
        ),
    ] = DEFAULT_ANSWER_WITHIN_SECONDS,
    address: AddressOption = None,
    as_json: JsonOption = False,
) -> None:
    """List every host's instances: state, root disk kind, current image and last rebuild.

    Each host's own worker lists them, all hosts at once. Exit 0 when every host answered, 2 when one
    did not (the others are listed). Example: rebuild instances --host kvm-07
    """
    cli = Cli.of(ctx)
    cli.run(_instances(cli, host, answer_within, address))


async def _instances(cli: Cli, hosts: list[str] | None, answer_within: float, address: str | None) -> int:
    from common.connection import connect
    from starter.instances import list_instances

    report = await list_instances(await connect(address), hosts, answer_within=answer_within)
    code = ExitCode.BAD_INPUT if report.silent_hosts else ExitCode.OK
    if cli.json:
        cli.print_json(report)
        return code
    if not report.hosts:
        cli.complain("no host has a worker polling now; name one with --host to ask it")
        return ExitCode.BAD_INPUT
    if report.instances:
        _print_table(cli, report.instances)
    else:
        cli.say(f"no instances on {', '.join(h.host for h in report.hosts if h.answered) or 'any host'}")
    for row in report.instances:
        if row.refusal is not None:
            cli.out.print(f"{row.instance} on {row.host}: not rebuildable: {row.refusal}", soft_wrap=False)
    for silent in report.hosts:
        if not silent.answered:
            cli.complain(f"host {silent.host}: {silent.error}")
    return code


async def found_host(cli: Cli, client: Client, instance: str) -> str:
    """``rebuild start`` without ``--host``: the one host whose worker lists the instance, said on stderr."""
    from starter.instances import host_of_instance

    found = await host_of_instance(client, instance)
    silent = f" (no worker answered on {', '.join(found.silent)})" if found.silent else ""
    cli.err.print(f"{instance} is on host {found.host}{silent}", markup=False)
    return found.host


async def rebuild_host(cli: Cli, client: Client, instance: str, host: str | None) -> str:
    """``status``, ``watch``, ``abort``, ...: the host given, else the host of the instance's rebuilds."""
    from starter.instances import host_of_rebuild

    if host is not None:
        return host
    found = await host_of_rebuild(client, instance)
    cli.err.print(f"{instance}: rebuild on host {found}", markup=False)
    return found


def _print_table(cli: Cli, rows: list[InstanceRow]) -> None:
    table = Table("host", "instance", "state", "root disk", "image", "last rebuild", box=None)
    for row in rows:
        disk = row.root_disk or "?"
        table.add_row(
            row.host,
            row.instance,
            row.state or "?",
            disk if row.rebuildable else f"{disk} (no)",
            _image(row),
            _last(row.last_rebuild),
        )
    cli.out.print(table, soft_wrap=False)


def _image(row: InstanceRow) -> str:
    """The image's file name (its URL is in --json), else its digest's start; - when none is recorded."""
    if row.image_url:
        name = urlsplit(row.image_url).path.rstrip("/").rpartition("/")[2]
        return name or row.image_url
    if row.image_sha256:
        return f"sha256:{row.image_sha256[:12]}"
    return "-"


def _last(last: LastRebuild | None) -> str:
    if last is None:
        return "-"
    if last.status == "RUNNING":
        return f"running: {last.phase or '?'}"
    outcome = last.phase if last.phase in _FINAL_PHASES else last.status.lower()
    when = last.closed or last.started
    return f"{outcome} {when:%m-%d %H:%M}"
