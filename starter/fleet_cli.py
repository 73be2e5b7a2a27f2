"""``rebuild fleet``: rolling rebuilds of many instances on many hosts, from the command line.

Exit codes from the one table (:mod:`common.exit_codes`): 0 every selected instance rebuilt or skipped
(or, without --wait, the command was done), 1 the fleet stopped with failures, was aborted, or a control
was refused, 2 bad input (a fleet of that name already running, unknown fleet, malformed options),
3 Temporal unreachable, 4 the fleet workflow was terminated, cancelled or timed out.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from common.exit_codes import ExitCode
from common.exit_codes import table as exit_code_table
from starter import rebuild_options as ro
from starter.cli_context import AddressOption, Cli, JsonOption, command, command_group, exit_for_fleet
from workflows.fleet_states import InstanceState

if TYPE_CHECKING:  # temporalio and the fleet's models load when a command runs, not for every --help
    from temporalio.client import Client

    from starter.fleets import FleetDescription
    from workflows.fleet_models import ControlAnswer, FleetRequest

EXIT_CODES_HELP = (
    "Exit codes for fleets: 0 every selected instance rebuilt or skipped (or the command done), 1 the "
    "fleet stopped with failures, was aborted, or a control was refused.\n\n"
    "Exit codes (every command):\n\n" + exit_code_table()
)

fleet_app = command_group(
    "Rolling rebuilds across many instances and hosts: batches, limits, a failure budget.", epilog=None
)
SELECTION_PANEL = "Which instances"
PACE_PANEL = "Pace and failure budget"
NameArgument = Annotated[str, typer.Argument(help="The fleet's name (as `rebuild fleet start` printed it).")]


@fleet_app.callback()
def _fleet_group(ctx: typer.Context) -> None:
    Cli.of(ctx).who = "rebuild fleet"


@command(fleet_app, "start", epilog=EXIT_CODES_HELP)
def start(
    ctx: typer.Context,
    image: ro.ImageOption = None,
    sha256: ro.Sha256Option = None,
    sha512: ro.Sha512Option = None,
    checksum: ro.ChecksumOption = None,
    disk_format: ro.DiskFormatOption = None,
    glance: ro.GlanceOption = None,
    glance_image: ro.GlanceImageOption = None,
    instances_file: Annotated[
        Path | None,
        typer.Option(
            rich_help_panel=SELECTION_PANEL,
            help="File with one 'HOST INSTANCE' per line (# comments allowed).",
        ),
    ] = None,
    select: Annotated[
        str | None,
        typer.Option(
            rich_help_panel=SELECTION_PANEL,
            help="Pattern (fnmatch) on instance names, applied to what each --host's worker lists.",
        ),
    ] = None,
    host: Annotated[
        list[str] | None,
        typer.Option(
            rich_help_panel=SELECTION_PANEL,
            help="A host whose instances --select chooses from; repeatable.",
        ),
    ] = None,
    batch: Annotated[
        int,
        typer.Option(
            rich_help_panel=PACE_PANEL,
            help="Instances per batch; a batch begins when the last ended.",
        ),
    ] = 10,
    max_unavailable: Annotated[
        int,
        typer.Option(
            rich_help_panel=PACE_PANEL,
            help="Never more than this many rebuilds at once.",
        ),
    ] = 1,
    max_failures: Annotated[
        int,
        typer.Option(
            rich_help_panel=PACE_PANEL,
            help="Start no more rebuilds once this many have failed.",
        ),
    ] = 1,
    exact_budget: Annotated[
        bool,
        typer.Option(
            "--exact-budget/--allow-overshoot",
            rich_help_panel=PACE_PANEL,
            help="Never run more rebuilds than failures left (stop at exactly --max-failures), or run "
            "--max-unavailable regardless and let those in flight fail past the budget.",
        ),
    ] = True,
    per_host: Annotated[
        int | None,
        typer.Option(
            rich_help_panel=PACE_PANEL,
            help="At most this many at once on a host.",
        ),
    ] = None,
    pause_between: Annotated[
        str,
        typer.Option(
            rich_help_panel=PACE_PANEL,
            help="Wait between batches, e.g. 30s, 5m.",
        ),
    ] = "0",
    prefetch: Annotated[
        bool,
        typer.Option(
            "--prefetch",
            rich_help_panel=PACE_PANEL,
            help="Fetch and check the image on every host before any stop.",
        ),
    ] = False,
    preflight: ro.PreflightOption = None,
    disk_mode: ro.DiskModeOption = None,
    name: Annotated[
        str | None, typer.Option(help="The fleet's name (default: derived from image and selection).")
    ] = None,
    start_after: ro.StartAfterOption = None,
    stop_timeout: ro.StopTimeoutOption = 60.0,
    boot_marker: ro.BootMarkerOption = None,
    boot_timeout: ro.BootTimeoutOption = 120.0,
    verify: ro.VerifyOption = None,
    require_approval: ro.RequireApprovalOption = False,
    approval_timeout: ro.ApprovalTimeoutOption = 3600.0,
    confirm_within: ro.ConfirmWithinOption = None,
    revert_by_default: ro.RevertByDefaultOption = False,
    ssh_key: ro.SshKeyOption = None,
    no_ssh_keys: ro.NoSshKeysOption = False,
    user_data: ro.UserDataOption = None,
    no_user_data: ro.NoUserDataOption = False,
    metadata: ro.MetadataOption = None,
    no_metadata: ro.NoMetadataOption = False,
    admin_password_file: ro.AdminPasswordFileOption = None,
    seed_format: ro.SeedFormatOption = None,
    requested_by: ro.RequestedByOption = ro.REQUESTED_BY,
    wait: Annotated[bool, typer.Option("--wait", help="Follow the fleet until it ends.")] = False,
    address: AddressOption = None,
    as_json: JsonOption = False,
) -> None:
    """Start a rolling rebuild of many instances, each with the options of `rebuild start`.

    Each rebuild waits for its own approval (rebuild approve INSTANCE --host HOST) and confirm window.

    Every guest gets the same identity: no per-guest host name or display name.

    Example: rebuild fleet start --image https://images.example/noble.qcow2 --sha256 HEX
    --select 'web-*' --host kvm-01 --host kvm-02 --batch 20 --max-unavailable 5 --per-host 2 --max-failures 3
    """
    from starter.fleets import default_name, parse_duration, read_instances_file
    from starter.identity_options import identity_change
    from workflows.fleet_models import (
        StrictFleetLimits,
        StrictFleetRequest,
        StrictRebuildOptions,
        StrictSelection,
    )

    cli = Cli.of(ctx)
    with cli.refusing("fleet"):
        sha256, sha512 = ro.digests(checksum, sha256, sha512)
        rebuild = StrictRebuildOptions(
            image_url=image,
            sha256=sha256,
            sha512=sha512,
            disk_format=disk_format,
            glance_url=glance,
            glance_image_id=glance_image,
            start_after=start_after,
            stop_timeout_seconds=stop_timeout,
            boot_marker=boot_marker,
            boot_timeout_seconds=boot_timeout,
            requested_by=requested_by,
            preflight=preflight,
            disk_mode=disk_mode,
            verify=verify,
            require_approval=require_approval,
            approval_timeout_seconds=approval_timeout,
            confirm_within_seconds=confirm_within,
            revert_by_default=revert_by_default,
            identity=identity_change(
                ssh_key_files=ssh_key,
                no_ssh_keys=no_ssh_keys,
                user_data_file=user_data,
                no_user_data=no_user_data,
                hostname=None,
                name=None,
                description=None,
                metadata=metadata,
                no_metadata=no_metadata,
                admin_password_file=admin_password_file,
                seed_format=ro.seed_format_of(seed_format),
            ),
        )
        if (instances_file is None) == (select is None):
            cli.fail(
                ExitCode.BAD_INPUT, "choose the instances with exactly one of --instances-file and --select"
            )
        if instances_file is not None:
            if host:
                cli.fail(
                    ExitCode.BAD_INPUT,
                    "--host goes with --select; an instances file names each instance's host",
                )
            selection = StrictSelection(instances=read_instances_file(instances_file))
        else:
            selection = StrictSelection(hosts=host or [], name_pattern=select)
        limits = StrictFleetLimits(
            batch_size=batch,
            max_unavailable=max_unavailable,
            per_host=per_host,
            max_failures=max_failures,
            exact_budget=exact_budget,
            pause_between_seconds=parse_duration(pause_between),
        )
        # Checked as the API checks it (the strict form); the workflow gets the wire form.
        request = StrictFleetRequest(
            name=name or default_name(rebuild, selection),
            rebuild=rebuild,
            selection=selection,
            limits=limits,
            prefetch=prefetch,
        ).wire()
    cli.run(_start(cli, request, wait, address))


async def _start(cli: Cli, request: FleetRequest, wait: bool, address: str | None) -> int:
    from common.connection import connect
    from starter.fleets import start_fleet

    handle = await start_fleet(await connect(address), request)
    if not wait:
        if cli.json:
            cli.print_json({"name": request.name, "workflow_id": handle.id, "run_id": handle.result_run_id})
        else:
            cli.say(f"started fleet {request.name}: workflow {handle.id}")
            cli.say(f"  follow it: rebuild fleet watch {request.name}")
        return ExitCode.OK
    if not cli.json:
        cli.say(f"started fleet {request.name}: workflow {handle.id}")
    return await _watch(cli, request.name, address)


@command(fleet_app, "status", epilog=EXIT_CODES_HELP)
def status(
    ctx: typer.Context,
    name: NameArgument,
    all_instances: Annotated[bool, typer.Option("--all", help="List every instance with its state.")] = False,
    state: Annotated[InstanceState | None, typer.Option(help="With --all: only this state.")] = None,
    address: AddressOption = None,
    as_json: JsonOption = False,
) -> None:
    """A fleet's progress: counts, limits, running rebuilds with their phases, failures.

    Example: rebuild fleet status fleet-3fa9c2d1e0 --all --state rolled-back
    """
    cli = Cli.of(ctx)
    cli.run(_status(cli, name, all_instances, state, address))


async def _status(
    cli: Cli, name: str, all_instances: bool, state: InstanceState | None, address: str | None
) -> int:
    from rich.table import Table

    from common.connection import connect
    from starter.fleets import describe_fleet, fleet_instances

    client = await connect(address)
    described = await describe_fleet(client, name)
    items = []
    if all_instances:
        offset = 0
        while True:
            page = await fleet_instances(client, name, state, offset)
            items.extend(page.items)
            offset += len(page.items)
            if not page.items or offset >= page.total:
                break
    if cli.json:
        document = described.model_dump(mode="json")
        if all_instances:
            document["instances"] = [i.model_dump(mode="json") for i in items]
        cli.print_json(document)
    else:
        _print_description(cli, described)
        if all_instances:
            table = Table("host", "instance", "state", "note", box=None)
            for item in items:
                table.add_row(item.host, item.instance, item.state.value, item.note or "")
            cli.out.print(table)
    return exit_for_fleet(described.workflow_status, described.report)


def _print_description(cli: Cli, described: FleetDescription) -> None:
    from starter.fleets import budget_window_text

    cli.say(f"{described.workflow_id}: {described.workflow_status}")
    status = described.status
    if status is None:
        if described.error:
            cli.say(f"  {described.error}")
        return
    c = status.counts
    paused = " (paused)" if status.paused else ""
    cli.say(f"  phase: {status.phase.value}{paused}, batch {status.batch_number + 1} of {status.batches}")
    cli.say(f"  image: {status.image}")
    cli.say(
        f"  {c.finished} of {c.total} done: {c.rebuilt} rebuilt, {c.rolled_back} rolled back, "
        f"{c.failed} failed, {c.skipped} skipped, {c.aborted} aborted; "
        f"{c.running} running, {c.waiting} waiting"
    )
    limits = status.limits
    cli.say(
        f"  limits: {limits.max_unavailable} at once, {limits.per_host or 'no limit'} per host, batch "
        f"{limits.batch_size}, {c.failures} of {limits.max_failures} failure(s) allowed"
    )
    if described.budget_window is not None:
        cli.say(f"  {budget_window_text(described.budget_window, status)}")
    for running in described.running:
        cli.say(f"  running: {running.instance} on {running.host} ({running.phase or '?'})")
    for problem in status.problems:
        cli.say(f"  {problem.state.value}: {problem.instance} on {problem.host}: {problem.note}")
    if status.stop_reason:
        cli.say(f"  stopped: {status.stop_reason}")
    if status.runs > 1:
        cli.say(f"  continued as new {status.runs - 1} time(s); history now {status.history_length} events")


@command(fleet_app, "watch", epilog=EXIT_CODES_HELP)
def watch(
    ctx: typer.Context, name: NameArgument, address: AddressOption = None, as_json: JsonOption = False
) -> None:
    """Follow a fleet live until it ends; exit code as for `rebuild fleet status` at the end.

    Example: rebuild fleet watch fleet-3fa9c2d1e0
    """
    cli = Cli.of(ctx)
    cli.run(_watch(cli, name, address))


async def _watch(cli: Cli, name: str, address: str | None) -> int:
    import asyncio

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from common.connection import connect
    from starter.fleets import describe_fleet

    client = await connect(address)
    if cli.json:
        described = await describe_fleet(client, name, child_phases=False)
        while described.workflow_status == "RUNNING":
            await asyncio.sleep(1)
            described = await describe_fleet(client, name, child_phases=False)
        cli.print_json(described)
        return exit_for_fleet(described.workflow_status, described.report)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=cli.out) as progress:
        task = progress.add_task("discover", total=None)
        while True:
            described = await describe_fleet(client, name)
            status = described.status
            if status is not None:
                c = status.counts
                running = ", ".join(f"{r.instance}:{r.phase or '?'}" for r in described.running[:4])
                more = f" +{len(described.running) - 4}" if len(described.running) > 4 else ""
                progress.update(
                    task,
                    description=(
                        f"{status.phase.value}{' (paused)' if status.paused else ''} "
                        f"{c.rebuilt} ok {c.failures} failed {c.skipped} skipped  {running}{more}"
                    ),
                    completed=c.finished,
                    total=c.total or None,
                )
            if described.workflow_status != "RUNNING":
                break
            await asyncio.sleep(1)
    _print_description(cli, described)
    return exit_for_fleet(described.workflow_status, described.report)


def _steer(cli: Cli, address: str | None, update: Callable[[Client], Awaitable[ControlAnswer]]) -> None:
    """pause, resume, batch-size, abort: one update each, whose answer says whether it was accepted."""

    async def steer() -> int:
        from common.connection import connect

        answer = await update(await connect(address))
        return cli.answered(answer, answer.accepted, answer.message, f"refused: {answer.message}")

    cli.run(steer())


@command(fleet_app, "pause", epilog=EXIT_CODES_HELP)
def pause(
    ctx: typer.Context, name: NameArgument, address: AddressOption = None, as_json: JsonOption = False
) -> None:
    """Start no new rebuilds; running ones finish. Example: rebuild fleet pause fleet-3fa9c2d1e0"""
    from starter.fleets import control_fleet

    _steer(Cli.of(ctx), address, lambda client: control_fleet(client, name, "pause"))


@command(fleet_app, "resume", epilog=EXIT_CODES_HELP)
def resume(
    ctx: typer.Context, name: NameArgument, address: AddressOption = None, as_json: JsonOption = False
) -> None:
    """Go on after a pause. Example: rebuild fleet resume fleet-3fa9c2d1e0"""
    from starter.fleets import control_fleet

    _steer(Cli.of(ctx), address, lambda client: control_fleet(client, name, "resume"))


@command(fleet_app, "batch-size", epilog=EXIT_CODES_HELP)
def batch_size(
    ctx: typer.Context,
    name: NameArgument,
    size: Annotated[int, typer.Argument(help="Instances per batch from the next batch on.")],
    address: AddressOption = None,
    as_json: JsonOption = False,
) -> None:
    """Change the batch size from the next batch on. Example: rebuild fleet batch-size fleet-3fa9c2d1e0 50"""
    from starter.fleets import resize_fleet
    from workflows.fleet_models import StrictBatchSize

    cli = Cli.of(ctx)
    with cli.refusing("batch size"):
        change = StrictBatchSize(batch_size=size)
    _steer(cli, address, lambda client: resize_fleet(client, name, change))


@command(fleet_app, "abort", epilog=EXIT_CODES_HELP)
def abort(
    ctx: typer.Context,
    name: NameArgument,
    reason: Annotated[str, typer.Option(help="Why: recorded in the fleet and in each aborted rebuild.")],
    requested_by: Annotated[str, typer.Option(help="Who asks.")] = os.environ.get("USER", "unknown"),
    address: AddressOption = None,
    as_json: JsonOption = False,
) -> None:
    """Start no more rebuilds and abort the running ones: each puts its instance back.

    Example: rebuild fleet abort fleet-3fa9c2d1e0 --reason "wrong image"
    """
    from starter.fleets import abort_fleet
    from workflows.fleet_models import StrictFleetAbort

    cli = Cli.of(ctx)
    with cli.refusing("abort"):
        request = StrictFleetAbort(reason=reason, requested_by=requested_by)
    _steer(cli, address, lambda client: abort_fleet(client, name, request))


@command(fleet_app, "list", epilog=EXIT_CODES_HELP)
def list_command(
    ctx: typer.Context,
    running: Annotated[bool, typer.Option("--running", help="Only fleets still running.")] = False,
    limit: Annotated[int, typer.Option(help="At most this many, newest first.")] = 50,
    address: AddressOption = None,
    as_json: JsonOption = False,
) -> None:
    """List fleets, newest first. Example: rebuild fleet list --running"""
    cli = Cli.of(ctx)
    cli.run(_list(cli, running, limit, address))


async def _list(cli: Cli, running: bool, limit: int, address: str | None) -> int:
    from common.connection import connect
    from starter.fleets import list_fleets

    rows = await list_fleets(await connect(address), running, limit)
    return cli.listing(rows, ("name", "status", "started"))
