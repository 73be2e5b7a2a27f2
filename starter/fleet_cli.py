"""``rebuild fleet``: rolling rebuilds of many instances on many hosts, from the command line.

Exit codes from the one table (:mod:`common.exit_codes`): 0 every selected instance rebuilt or skipped
(or, without --wait, the command was done), 1 the fleet stopped with failures, was aborted, or a control
was refused, 2 bad input (a fleet of that name already running, unknown fleet, malformed options),
3 Temporal unreachable, 4 the fleet workflow was terminated, cancelled or timed out.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Coroutine
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from common.connection import TemporalUnavailable, connect
from common.exit_codes import ExitCode, leave
from common.exit_codes import table as exit_code_table
from starter.fleets import (
    BadInstancesFile,
    FleetAlreadyRunning,
    FleetDescription,
    FleetNotRunning,
    UnknownFleet,
    abort_fleet,
    control_fleet,
    default_name,
    describe_fleet,
    fleet_instances,
    list_fleets,
    parse_duration,
    read_instances_file,
    resize_fleet,
    start_fleet,
)
from starter.rebuilds import validation_problems
from workflows.fleet_models import (
    ControlAnswer,
    FleetRequest,
    InstanceState,
    StrictBatchSize,
    StrictFleetAbort,
    StrictFleetLimits,
    StrictFleetRequest,
    StrictRebuildOptions,
    StrictSelection,
)

EXIT_OK, EXIT_FAILED = ExitCode.OK, ExitCode.FAILED
EXIT_BAD_INPUT, EXIT_UNAVAILABLE = ExitCode.BAD_INPUT, ExitCode.UNAVAILABLE
EXIT_CODES_HELP = (
    "Exit codes for fleets: 0 every selected instance rebuilt or skipped (or the command done), 1 the "
    "fleet stopped with failures, was aborted, or a control was refused.\n\n"
    "Exit codes (every command):\n\n" + exit_code_table()
)

fleet_app = typer.Typer(
    no_args_is_help=True,
    help="Rolling rebuilds across many instances and hosts: batches, limits, a failure budget.",
)
out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

NameArgument = Annotated[str, typer.Argument(help="The fleet's name (as `rebuild fleet start` printed it).")]
AddressOption = Annotated[
    str | None,
    typer.Option(help="Temporal address; default from TEMPORAL_ADDRESS / envconfig, else localhost:7233."),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]


def _run(coro: Coroutine[Any, Any, int]) -> NoReturn:
    try:
        code = asyncio.run(coro)
    except (FleetAlreadyRunning, UnknownFleet, FleetNotRunning, ValueError) as exc:
        err.print(f"rebuild fleet: {exc}", markup=False)
        code = EXIT_BAD_INPUT
    except TemporalUnavailable as exc:
        err.print(f"rebuild fleet: {exc}", markup=False)
        code = EXIT_UNAVAILABLE
    except KeyboardInterrupt:
        code = ExitCode.INTERRUPTED
    leave(code)


def _bad_input(message: str) -> NoReturn:
    err.print(f"rebuild fleet: {message}", markup=False)
    leave(EXIT_BAD_INPUT)


@fleet_app.command(epilog=EXIT_CODES_HELP, name="start")
def start(
    image: Annotated[str | None, typer.Option(help="URL of the new image (http(s):// or file:///).")] = None,
    sha256: Annotated[str | None, typer.Option(help="Expected SHA-256 of the image, hex.")] = None,
    sha512: Annotated[str | None, typer.Option(help="Expected SHA-512 of the image, hex.")] = None,
    disk_format: Annotated[str | None, typer.Option(help="Declared format: raw or qcow2.")] = None,
    glance: Annotated[str | None, typer.Option(help="Glance URL (with --glance-image).")] = None,
    glance_image: Annotated[str | None, typer.Option(help="Glance v2 image ID (with --glance).")] = None,
    instances_file: Annotated[
        Path | None, typer.Option(help="File with one 'HOST INSTANCE' per line (# comments allowed).")
    ] = None,
    select: Annotated[
        str | None,
        typer.Option(help="Pattern (fnmatch) on instance names, applied to what each --host's worker lists."),
    ] = None,
    host: Annotated[
        list[str] | None, typer.Option(help="A host whose instances --select chooses from; repeatable.")
    ] = None,
    batch: Annotated[int, typer.Option(help="Instances per batch; a batch begins when the last ended.")] = 10,
    max_unavailable: Annotated[int, typer.Option(help="Never more than this many rebuilds at once.")] = 1,
    max_failures: Annotated[int, typer.Option(help="Start no more rebuilds once this many have failed.")] = 1,
    exact_budget: Annotated[
        bool,
        typer.Option(
            "--exact-budget/--allow-overshoot",
            help="Never run more rebuilds than failures left (stop at exactly --max-failures), or run "
            "--max-unavailable regardless and let those in flight fail past the budget.",
        ),
    ] = True,
    per_host: Annotated[int | None, typer.Option(help="At most this many at once on a host.")] = None,
    pause_between: Annotated[str, typer.Option(help="Wait between batches, e.g. 30s, 5m.")] = "0",
    prefetch: Annotated[
        bool, typer.Option("--prefetch", help="Fetch and check the image on every host before any stop.")
    ] = False,
    preflight: Annotated[
        bool | None,
        typer.Option(
            "--preflight/--no-preflight",
            help="Each rebuild boots the new image in a sandbox before its stop (default: each worker's).",
        ),
    ] = None,
    name: Annotated[
        str | None, typer.Option(help="The fleet's name (default: derived from image and selection).")
    ] = None,
    start_after: Annotated[
        bool | None,
        typer.Option("--start/--no-start", help="Start instances afterwards (default: if running before)."),
    ] = None,
    stop_timeout: Annotated[float, typer.Option(help="Seconds of ACPI shutdown before forced off.")] = 60.0,
    boot_marker: Annotated[
        str | None, typer.Option(help="Text the new image must print on the serial console.")
    ] = None,
    boot_timeout: Annotated[float, typer.Option(help="Seconds to wait for --boot-marker.")] = 120.0,
    requested_by: Annotated[str, typer.Option(help="Who asked, shown in the Web UI.")] = os.environ.get(
        "USER", "unknown"
    ),
    wait: Annotated[bool, typer.Option("--wait", help="Follow the fleet until it ends.")] = False,
    address: AddressOption = None,
    as_json: JsonOption = False,
) -> None:
    """Start a rolling rebuild of many instances.

    Example: rebuild fleet start --image https://images.example/noble.qcow2 --sha256 HEX
    --select 'web-*' --host kvm-01 --host kvm-02 --batch 20 --max-unavailable 5 --per-host 2 --max-failures 3
    """
    try:
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
        )
        if (instances_file is None) == (select is None):
            _bad_input("choose the instances with exactly one of --instances-file and --select")
        if instances_file is not None:
            if host:
                _bad_input("--host goes with --select; an instances file names each instance's host")
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
        request = StrictFleetRequest(
            name=name or default_name(rebuild, selection),
            rebuild=rebuild,
            selection=selection,
            limits=limits,
            prefetch=prefetch,
        ).wire()
    except ValidationError as exc:
        _bad_input(f"invalid fleet: {validation_problems(exc)}")
    except (BadInstancesFile, ValueError) as exc:
        _bad_input(str(exc))
    _run(_start(request, wait, address, as_json))


async def _start(request: FleetRequest, wait: bool, address: str | None, as_json: bool) -> int:
    client = await connect(address)
    handle = await start_fleet(client, request)
    if not wait:
        if as_json:
            started = {"name": request.name, "workflow_id": handle.id, "run_id": handle.result_run_id}
            print(json.dumps(started))
        else:
            out.print(f"started fleet {request.name}: workflow {handle.id}")
            out.print(f"  follow it: rebuild fleet watch {request.name}")
        return EXIT_OK
    if not as_json:
        out.print(f"started fleet {request.name}: workflow {handle.id}")
    return await _watch(request.name, address, as_json)


@fleet_app.command(epilog=EXIT_CODES_HELP, name="status")
def status(
    name: NameArgument,
    all_instances: Annotated[bool, typer.Option("--all", help="List every instance with its state.")] = False,
    state: Annotated[InstanceState | None, typer.Option(help="With --all: only this state.")] = None,
    address: AddressOption = None,
    as_json: JsonOption = False,
) -> None:
    """A fleet's progress: counts, limits, running rebuilds with their phases, failures.

    Example: rebuild fleet status fleet-3fa9c2d1e0 --all --state rolled-back
    """
    _run(_status(name, all_instances, state, address, as_json))


async def _status(
    name: str, all_instances: bool, state: InstanceState | None, address: str | None, as_json: bool
) -> int:
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
    if as_json:
        document = described.model_dump(mode="json")
        if all_instances:
            document["instances"] = [i.model_dump(mode="json") for i in items]
        print(json.dumps(document))
    else:
        _print_description(described)
        if all_instances:
            table = Table("host", "instance", "state", "note", box=None)
            for item in items:
                table.add_row(item.host, item.instance, item.state.value, item.note or "")
            out.print(table)
    return _exit_code(described)


def _exit_code(described: FleetDescription) -> int:
    if described.workflow_status == "RUNNING":
        return EXIT_OK
    if described.workflow_status in ("TERMINATED", "CANCELED", "TIMED_OUT"):
        return ExitCode.ENDED_WITHOUT_RESULT
    report = described.report
    if report is None or report.stop_reason is not None or report.counts.failures:
        return EXIT_FAILED
    return EXIT_OK


def _print_description(described: FleetDescription) -> None:
    out.print(f"{described.workflow_id}: {described.workflow_status}")
    status = described.status
    if status is None:
        if described.error:
            out.print(f"  {described.error}", markup=False)
        return
    c = status.counts
    paused = " (paused)" if status.paused else ""
    out.print(f"  phase: {status.phase.value}{paused}, batch {status.batch_number + 1} of {status.batches}")
    out.print(f"  image: {status.image}", markup=False)
    out.print(
        f"  {c.finished} of {c.total} done: {c.rebuilt} rebuilt, {c.rolled_back} rolled back, "
        f"{c.failed} failed, {c.skipped} skipped, {c.aborted} aborted; "
        f"{c.running} running, {c.waiting} waiting"
    )
    limits = status.limits
    out.print(
        f"  limits: {limits.max_unavailable} at once, {limits.per_host or 'no limit'} per host, batch "
        f"{limits.batch_size}, {c.failures} of {limits.max_failures} failure(s) allowed"
    )
    for running in described.running:
        out.print(f"  running: {running.instance} on {running.host} ({running.phase or '?'})", markup=False)
    for problem in status.problems:
        line = f"  {problem.state.value}: {problem.instance} on {problem.host}: {problem.note}"
        out.print(line, markup=False)
    if status.stop_reason:
        out.print(f"  stopped: {status.stop_reason}", markup=False)
    if status.runs > 1:
        out.print(f"  continued as new {status.runs - 1} time(s); history now {status.history_length} events")


@fleet_app.command(epilog=EXIT_CODES_HELP, name="watch")
def watch(name: NameArgument, address: AddressOption = None, as_json: JsonOption = False) -> None:
    """Follow a fleet live until it ends; exit code as for `rebuild fleet status` at the end.

    Example: rebuild fleet watch fleet-3fa9c2d1e0
    """
    _run(_watch(name, address, as_json))


async def _watch(name: str, address: str | None, as_json: bool) -> int:
    client = await connect(address)
    if as_json:
        described = await describe_fleet(client, name, child_phases=False)
        while described.workflow_status == "RUNNING":
            await asyncio.sleep(1)
            described = await describe_fleet(client, name, child_phases=False)
        print(described.model_dump_json())
        return _exit_code(described)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=out) as progress:
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
    _print_description(described)
    return _exit_code(described)


def _print_answer(answer: ControlAnswer, as_json: bool) -> int:
    if as_json:
        print(answer.model_dump_json())
    elif answer.accepted:
        out.print(answer.message, markup=False)
    else:
        err.print(f"rebuild fleet: refused: {answer.message}", markup=False)
    return EXIT_OK if answer.accepted else EXIT_FAILED


async def _control(name: str, action: str, address: str | None, as_json: bool) -> int:
    client = await connect(address)
    return _print_answer(await control_fleet(client, name, action), as_json)


@fleet_app.command(epilog=EXIT_CODES_HELP, name="pause")
def pause(name: NameArgument, address: AddressOption = None, as_json: JsonOption = False) -> None:
    """Start no new rebuilds; running ones finish. Example: rebuild fleet pause fleet-3fa9c2d1e0"""
    _run(_control(name, "pause", address, as_json))


@fleet_app.command(epilog=EXIT_CODES_HELP, name="resume")
def resume(name: NameArgument, address: AddressOption = None, as_json: JsonOption = False) -> None:
    """Go on after a pause. Example: rebuild fleet resume fleet-3fa9c2d1e0"""
    _run(_control(name, "resume", address, as_json))


@fleet_app.command(epilog=EXIT_CODES_HELP, name="batch-size")
def batch_size(
    name: NameArgument,
    size: Annotated[int, typer.Argument(help="Instances per batch from the next batch on.")],
    address: AddressOption = None,
    as_json: JsonOption = False,
) -> None:
    """Change the batch size from the next batch on. Example: rebuild fleet batch-size fleet-3fa9c2d1e0 50"""
    try:
        change = StrictBatchSize(batch_size=size)
    except ValidationError as exc:
        _bad_input(f"invalid batch size: {validation_problems(exc)}")
    _run(_resize(name, change, address, as_json))


async def _resize(name: str, change: StrictBatchSize, address: str | None, as_json: bool) -> int:
    client = await connect(address)
    return _print_answer(await resize_fleet(client, name, change), as_json)


@fleet_app.command(epilog=EXIT_CODES_HELP, name="abort")
def abort(
    name: NameArgument,
    reason: Annotated[str, typer.Option(help="Why: recorded in the fleet and in each aborted rebuild.")],
    requested_by: Annotated[str, typer.Option(help="Who asks.")] = os.environ.get("USER", "unknown"),
    address: AddressOption = None,
    as_json: JsonOption = False,
) -> None:
    """Start no more rebuilds and abort the running ones: each puts its instance back.

    Example: rebuild fleet abort fleet-3fa9c2d1e0 --reason "wrong image"
    """
    try:
        request = StrictFleetAbort(reason=reason, requested_by=requested_by)
    except ValidationError as exc:
        _bad_input(f"invalid abort: {validation_problems(exc)}")
    _run(_abort(name, request, address, as_json))


async def _abort(name: str, request: StrictFleetAbort, address: str | None, as_json: bool) -> int:
    client = await connect(address)
    return _print_answer(await abort_fleet(client, name, request), as_json)


@fleet_app.command(epilog=EXIT_CODES_HELP, name="list")
def list_command(
    running: Annotated[bool, typer.Option("--running", help="Only fleets still running.")] = False,
    limit: Annotated[int, typer.Option(help="At most this many, newest first.")] = 50,
    address: AddressOption = None,
    as_json: JsonOption = False,
) -> None:
    """List fleets, newest first. Example: rebuild fleet list --running"""
    _run(_list(running, limit, address, as_json))


async def _list(running: bool, limit: int, address: str | None, as_json: bool) -> int:
    client = await connect(address)
    rows = await list_fleets(client, running, limit)
    if as_json:
        print(json.dumps([row.model_dump() for row in rows]))
        return EXIT_OK
    table = Table("name", "status", "started", box=None)
    for row in rows:
        table.add_row(row.name, str(row.status), row.started)
    out.print(table)
    return EXIT_OK
