"""``rebuild``: the operator's command line.

Exit codes: one table for every command, :mod:`common.exit_codes`, shown in ``--help``.
This module talks to Temporal only; the ``cache`` commands, which run on a hypervisor host, load
libvirt and the cache code when they are used.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import socket
import sys
from collections.abc import Coroutine
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table
from temporalio.client import (
    WorkflowFailureError,
    WorkflowHandle,
)
from temporalio.exceptions import ApplicationError, CancelledError, TerminatedError, TimeoutError
from temporalio.service import RPCError, RPCStatusCode

from common.connection import TemporalUnavailable, connect
from common.exit_codes import ExitCode, leave
from common.exit_codes import table as exit_code_table
from starter.cli_settings import connection_options
from starter.fleet_cli import fleet_app
from starter.identity_options import IdentityOptionError, identity_change
from starter.rebuilds import (
    BadFilter,
    NoWorkerOnHost,
    RebuildAlreadyRunning,
    RebuildNotRunning,
    UnknownRebuild,
    abort_rebuild,
    describe_rebuild,
    latest_rebuild,
    list_query,
    list_rebuilds,
    query_status,
    send_decision,
    start_rebuild,
    validation_problems,
)
from workflows.identity import SeedFormat
from workflows.models import (
    AbortRequest,
    Decision,
    RebuildRequest,
    RebuildResult,
    StrictAbortRequest,
    StrictDecision,
    StrictRebuildRequest,
)

THIS_HOST = socket.gethostname()
EXIT_REBUILT, EXIT_FAILED, EXIT_BAD_INPUT = ExitCode.OK, ExitCode.FAILED, ExitCode.BAD_INPUT
EXIT_UNAVAILABLE, EXIT_NO_RESULT = ExitCode.UNAVAILABLE, ExitCode.ENDED_WITHOUT_RESULT
# Failures that mean the request itself was wrong, not that the rebuild broke.
BAD_INPUT_TYPES = {"InstanceNotFound", "UnsupportedInstance", "InvalidRequest"}
# What `status`, `watch` and `start --wait` exit with for each way a workflow can be.
EXIT_FOR_WORKFLOW_STATUS = {
    "RUNNING": ExitCode.OK,
    "COMPLETED": ExitCode.OK,
    "FAILED": ExitCode.FAILED,
    "TERMINATED": ExitCode.ENDED_WITHOUT_RESULT,
    "CANCELED": ExitCode.ENDED_WITHOUT_RESULT,
    "TIMED_OUT": ExitCode.ENDED_WITHOUT_RESULT,
}
EXIT_CODES_HELP = "Exit codes (every command):\n\n" + exit_code_table()

app = typer.Typer(
    no_args_is_help=True,
    help="Rebuild KVM/libvirt instances durably: a fresh root disk from a new image, or the old one back.",
    epilog=EXIT_CODES_HELP,
)
out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

HostOption = Annotated[
    str,
    typer.Option(
        envvar="REBUILD_HOST", help="Hypervisor host of the instance (its worker polls rebuild-host-HOST)."
    ),
]
AddressOption = Annotated[
    str | None,
    typer.Option(help="Temporal address; default from TEMPORAL_ADDRESS / envconfig, else localhost:7233."),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]


class CliExit(Exception):
    def __init__(self, code: int, message: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _run(coro: Coroutine[Any, Any, int]) -> NoReturn:
    message: str | None
    try:
        code, message = asyncio.run(coro), None
    except CliExit as exc:
        code, message = exc.code, exc.message
    except (RebuildAlreadyRunning, UnknownRebuild, RebuildNotRunning, NoWorkerOnHost, ValueError) as exc:
        code, message = EXIT_BAD_INPUT, str(exc)
    except TemporalUnavailable as exc:
        code, message = EXIT_UNAVAILABLE, str(exc)
    except RPCError as exc:
        # Temporal refused the call (an unknown namespace, a denied API key): its message, no traceback.
        unavailable = exc.status in (RPCStatusCode.UNAVAILABLE, RPCStatusCode.DEADLINE_EXCEEDED)
        code, message = (EXIT_UNAVAILABLE if unavailable else EXIT_FAILED), f"Temporal: {exc.message}"
    except KeyboardInterrupt:
        code, message = ExitCode.INTERRUPTED, None
    if message:
        if "--json" in sys.argv[1:]:
            print(json.dumps({"error": message, "exit_code": code}))
        else:
            err.print(f"rebuild: {message}", markup=False)
    leave(code)


@app.command(epilog=EXIT_CODES_HELP)
def start(
    instance: Annotated[str, typer.Argument(help="libvirt domain name of the instance.")],
    image: Annotated[
        str | None,
        typer.Option(help="URL of the new image: http(s)://, or file:/// inside the worker's image dir."),
    ] = None,
    sha256: Annotated[str | None, typer.Option(help="Expected SHA-256 of the image, hex.")] = None,
    sha512: Annotated[str | None, typer.Option(help="Expected SHA-512 of the image, hex.")] = None,
    checksum: Annotated[
        str | None, typer.Option(help="Expected digest as ALGO:HEX (sha256 or sha512).")
    ] = None,
    disk_format: Annotated[
        str | None,
        typer.Option(help="Declared format (raw or qcow2); an image whose header differs is refused."),
    ] = None,
    glance: Annotated[
        str | None, typer.Option(help="Glance image service URL (with --glance-image).")
    ] = None,
    glance_image: Annotated[str | None, typer.Option(help="Glance v2 image ID (with --glance).")] = None,
    host: HostOption = THIS_HOST,
    wait: Annotated[bool, typer.Option("--wait", help="Wait for the result and show progress.")] = False,
    start_after: Annotated[
        bool | None,
        typer.Option(
            "--start/--no-start", help="Start the instance afterwards (default: if it was running)."
        ),
    ] = None,
    stop_timeout: Annotated[
        float,
        typer.Option(
            help="Seconds to wait for a graceful shutdown (ACPI, then the guest agent) before forcing it off."
        ),
    ] = 60.0,
    boot_marker: Annotated[
        str | None,
        typer.Option(help="Text the new image must print on the serial console, or it is rolled back."),
    ] = None,
    boot_timeout: Annotated[
        float, typer.Option(help="Seconds the new image has to pass --boot-marker or --verify.")
    ] = 120.0,
    verify: Annotated[
        str | None,
        typer.Option(
            help="How the new image proves it booted, or it is rolled back: agent (the guest agent "
            "answers), console:REGEX (the serial console prints a match), running:SECONDS (only "
            "that the domain runs: it cannot tell an empty disk from a booted one). "
            "Default: agent where the domain has a guest agent channel, else running:5. Whatever "
            "the mode, the running root disk must be an overlay on the new image."
        ),
    ] = None,
    require_approval: Annotated[
        bool, typer.Option("--require-approval", help="Wait for `rebuild approve` before stopping.")
    ] = False,
    approval_timeout: Annotated[
        float, typer.Option(help="Seconds to wait for approval; then it ends with nothing changed.")
    ] = 3600.0,
    confirm_within: Annotated[
        float | None,
        typer.Option(help="Keep the old disk this many seconds for `rebuild confirm` or `rebuild revert`."),
    ] = None,
    revert_by_default: Annotated[
        bool, typer.Option("--revert-by-default", help="At the confirm window's end, revert (not confirm).")
    ] = False,
    requested_by: Annotated[str, typer.Option(help="Who asked, shown in the Web UI.")] = os.environ.get(
        "USER", "unknown"
    ),
    ssh_key: Annotated[
        list[Path] | None, typer.Option(help="Public key file for the guest (repeatable); replaces the keys.")
    ] = None,
    no_ssh_keys: Annotated[bool, typer.Option("--no-ssh-keys", help="Remove the guest's keys.")] = False,
    user_data: Annotated[
        Path | None, typer.Option(help="cloud-config or script for cloud-init, at most 64 KiB.")
    ] = None,
    no_user_data: Annotated[bool, typer.Option("--no-user-data", help="Remove the user data.")] = False,
    hostname: Annotated[str | None, typer.Option(help="The guest's host name (RFC 1123).")] = None,
    name: Annotated[str | None, typer.Option(help="Display name, recorded with the instance.")] = None,
    description: Annotated[str | None, typer.Option(help="Description, recorded.")] = None,
    metadata: Annotated[
        list[str] | None, typer.Option(help="KEY=VALUE for the guest's metadata (repeatable); replaces it.")
    ] = None,
    no_metadata: Annotated[bool, typer.Option("--no-metadata", help="Remove the metadata.")] = False,
    admin_password_file: Annotated[
        Path | None,
        typer.Option(help="File holding root's new password; hashed here, never sent in clear."),
    ] = None,
    seed_format: Annotated[
        str | None, typer.Option(help="cloud-init seed: nocloud (default) or config-drive (Nova's).")
    ] = None,
    preflight: Annotated[
        bool | None,
        typer.Option(
            "--preflight/--no-preflight",
            help="Boot the new image in a throwaway sandbox first; a broken image then fails with "
            "the instance never stopped (default: the host worker's setting).",
        ),
    ] = None,
    root_disk: Annotated[
        str | None,
        typer.Option(
            help="The root disk's target device (vda, sdb, ...), where the boot order does not make "
            "it certain. Default: the first disk in the domain's boot order."
        ),
    ] = None,
    discard_snapshots: Annotated[
        bool,
        typer.Option(
            "--discard-snapshots",
            help="Rebuild although the instance has snapshots: they go with the old disk once the "
            "rebuild is kept (a rollback brings them back).",
        ),
    ] = False,
    address: AddressOption = None,
    as_json: JsonOption = False,
) -> None:
    """Start a rebuild of INSTANCE from --image.

    Identity options follow Nova's rebuild: one not given keeps the instance's value, --no-... removes it.

    Example: rebuild start web-1 --image https://images.example/noble.qcow2 --sha256 HEX --wait
    """
    try:
        if checksum is not None:
            algo, _, value = checksum.partition(":")
            if algo.lower() not in ("sha256", "sha512") or not value:
                raise CliExit(
                    EXIT_BAD_INPUT, f"--checksum must be sha256:HEX or sha512:HEX, not {checksum!r}"
                )
            if algo.lower() == "sha256":
                sha256 = sha256 or value
            else:
                sha512 = sha512 or value
        request = StrictRebuildRequest(
            instance=instance,
            host=host,
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
            verify=verify,
            require_approval=require_approval,
            approval_timeout_seconds=approval_timeout,
            confirm_within_seconds=confirm_within,
            revert_by_default=revert_by_default,
            requested_by=requested_by,
            preflight=preflight,
            root_disk=root_disk,
            discard_snapshots=discard_snapshots,
            identity=identity_change(
                ssh_key_files=ssh_key,
                no_ssh_keys=no_ssh_keys,
                user_data_file=user_data,
                no_user_data=no_user_data,
                hostname=hostname,
                name=name,
                description=description,
                metadata=metadata,
                no_metadata=no_metadata,
                admin_password_file=admin_password_file,
                seed_format=_seed_format(seed_format),
            ),
        )
    except IdentityOptionError as exc:
        err.print(f"rebuild: {exc}", markup=False)
        leave(EXIT_BAD_INPUT)
    except ValidationError as exc:
        problems = validation_problems(exc)
        err.print(f"rebuild: invalid request: {problems}", markup=False)
        leave(EXIT_BAD_INPUT)
    except CliExit as exc:
        err.print(f"rebuild: {exc.message}", markup=False)
        leave(exc.code)
    _run(_start(request, wait, address, as_json))


def _seed_format(value: str | None) -> SeedFormat | None:
    if value is None:
        return None
    if value not in ("nocloud", "config-drive"):
        raise IdentityOptionError(f"--seed-format must be nocloud or config-drive, not {value!r}")
    return "nocloud" if value == "nocloud" else "config-drive"


async def _start(request: RebuildRequest, wait: bool, address: str | None, as_json: bool) -> int:
    client = await connect(address)
    handle = await start_rebuild(client, request)
    if not wait:
        if as_json:
            print(json.dumps({"workflow_id": handle.id, "run_id": handle.result_run_id}))
        else:
            out.print(f"started rebuild of {request.instance} on {request.host}: workflow {handle.id}")
        return EXIT_REBUILT
    return await _wait(handle, as_json)


async def _wait(handle: WorkflowHandle[Any, RebuildResult], as_json: bool) -> int:
    watcher = asyncio.create_task(_show_phases(handle, quiet=as_json))
    try:
        rebuilt = await handle.result()
    except WorkflowFailureError as failure:
        outcome = _failure_result(failure)
        watcher.cancel()
        if as_json:
            print(outcome.model_dump_json() if outcome else json.dumps({"error": str(failure.cause)}))
        else:
            message = failure.cause.message if isinstance(failure.cause, ApplicationError) else failure.cause
            err.print(f"rebuild: {message}", markup=False)
        if isinstance(failure.cause, TerminatedError | CancelledError | TimeoutError):
            return EXIT_NO_RESULT
        if outcome and outcome.error_type in BAD_INPUT_TYPES:
            return EXIT_BAD_INPUT
        return EXIT_FAILED
    watcher.cancel()
    if as_json:
        print(rebuilt.model_dump_json())
    else:
        _print_result(rebuilt)
    return EXIT_REBUILT


def _failure_result(failure: WorkflowFailureError) -> RebuildResult | None:
    cause = failure.cause
    if isinstance(cause, ApplicationError) and cause.details:
        try:
            return RebuildResult.model_validate(cause.details[0])
        except ValidationError:
            return None
    return None


async def _show_phases(handle: WorkflowHandle[Any, Any], quiet: bool) -> None:
    seen = None
    while True:
        try:
            status = await query_status(handle)
            if status.phase != seen and not quiet:
                err.print(f"  phase: {status.phase.value}", markup=False)
                seen = status.phase
        except RPCError:
            pass
        await asyncio.sleep(0.3)


def _print_result(result: RebuildResult) -> None:
    out.print(f"rebuilt {result.instance} on {result.host}: image sha256 {result.image_sha256}")
    timings = ", ".join(f"{step} {seconds:.2f}s" for step, seconds in result.step_seconds.items())
    out.print(f"  steps: {timings}")
    if result.downtime_seconds is not None:
        forced = " (forced off after the graceful timeout)" if result.forced_stop else ""
        out.print(f"  downtime: {result.downtime_seconds:.2f}s{forced}")
    if result.stopped_by is not None:
        out.print(f"  stopped by: {result.stopped_by}")
    if result.verified_by is not None:
        out.print(f"  verified by: {result.verified_by}", markup=False)


@app.command(epilog=EXIT_CODES_HELP)
def status(
    instance: Annotated[str, typer.Argument(help="libvirt domain name of the instance.")],
    host: HostOption = THIS_HOST,
    address: AddressOption = None,
    as_json: JsonOption = False,
) -> None:
    """Show the latest rebuild of INSTANCE: phase, step timings, attempts and last error.

    Exits 0 while it runs and once it completed, 1 when it failed, 4 when it was terminated, cancelled
    or timed out. Example: rebuild status web-1 --host kvm-07
    """
    _run(_status(instance, host, address, as_json))


async def _status(instance: str, host: str, address: str | None, as_json: bool) -> int:
    client = await connect(address)
    described = await describe_rebuild(client, instance, host)
    code = EXIT_FOR_WORKFLOW_STATUS.get(described.workflow_status, EXIT_NO_RESULT)
    if as_json:
        print(described.model_dump_json())
        return code
    out.print(f"{described.workflow_id}: {described.workflow_status}")
    state = described.status
    if state:
        out.print(f"  phase: {state.phase.value}")
        if state.summary:
            out.print(f"  state: {state.summary}", markup=False)
        if state.rebuild_id:
            out.print(f"  rebuild id: {state.rebuild_id} (names the backup next to the disk)", markup=False)
        out.print(f"  image: {state.image_url}", markup=False)
        if state.step_seconds:
            timings = ", ".join(f"{k} {v:.2f}s" for k, v in state.step_seconds.items())
            out.print(f"  steps: {timings}")
        out.print(f"  verify: {state.verified_by or state.verify}", markup=False)
        if state.stopped_by is not None:
            out.print(f"  stopped by: {state.stopped_by}")
        if state.last_error:
            out.print(f"  last error: {state.last_error}", markup=False)
        for ignored in state.ignored_signals:
            out.print(f"  {ignored}", markup=False)
    for p in described.pending_activities:
        line = f"  running {p.activity}, attempt {p.attempt}"
        if p.last_error:
            line += f", last error: {p.last_error}"
        out.print(line, markup=False)
    if described.waiting_for_worker:
        out.print(f"  {described.waiting_for_worker}", markup=False)
    return code


@app.command(epilog=EXIT_CODES_HELP)
def watch(
    instance: Annotated[str, typer.Argument(help="libvirt domain name of the instance.")],
    host: HostOption = THIS_HOST,
    address: AddressOption = None,
    as_json: JsonOption = False,
) -> None:
    """Follow a rebuild live: phase, a progress bar with bytes and speed while it downloads, step timings.

    Ends when the rebuild ends (with --json: prints its final status as JSON); exit code as for
    `rebuild start --wait`. Example: rebuild watch web-1
    """
    _run(_watch(instance, host, address, as_json))


async def _watch(instance: str, host: str, address: str | None, as_json: bool) -> int:
    client = await connect(address)
    if as_json:
        handle, _ = await latest_rebuild(client, instance, host)
        with contextlib.suppress(WorkflowFailureError):
            await handle.result()
        described = await describe_rebuild(client, instance, host)
        print(described.model_dump_json())
        return _watch_exit(described.workflow_status)
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=out, transient=False) as progress:
        task = progress.add_task("inspect", total=None)
        while True:
            described = await describe_rebuild(client, instance, host)
            state = described.status
            phase = state.phase.value if state else "?"
            fetch = next((p for p in described.pending_activities if p.progress_bytes is not None), None)
            timings = ", ".join(f"{k} {v:.1f}s" for k, v in state.step_seconds.items()) if state else ""
            retry = next((p for p in described.pending_activities if p.attempt > 1), None)
            note = f" (attempt {retry.attempt}: {retry.last_error})" if retry else ""
            if described.waiting_for_worker:
                note = f" ({described.waiting_for_worker})"
            progress.update(
                task,
                description=f"{phase}{note}  {timings}",
                completed=fetch.progress_bytes if fetch else None,
                total=fetch.total_bytes if fetch else None,
            )
            if described.workflow_status != "RUNNING":
                break
            await asyncio.sleep(0.5)
    out.print(f"{described.workflow_id}: {described.workflow_status}")
    if state and state.last_error:
        out.print(f"  {state.last_error}", markup=False)
    return _watch_exit(described.workflow_status)


def _watch_exit(workflow_status: str) -> int:
    """As ``start --wait``: 0 only for a completed rebuild, 4 when it ended without a result."""
    if workflow_status == "COMPLETED":
        return EXIT_REBUILT
    return EXIT_FAILED if workflow_status == "FAILED" else EXIT_NO_RESULT


@app.command(epilog=EXIT_CODES_HELP)
def abort(
    instance: Annotated[str, typer.Argument(help="libvirt domain name of the instance.")],
    reason: Annotated[str, typer.Option(help="Why: recorded in the workflow and shown in the Web UI.")],
    host: HostOption = THIS_HOST,
    requested_by: Annotated[str, typer.Option(help="Who asks.")] = os.environ.get("USER", "unknown"),
    address: AddressOption = None,
    as_json: JsonOption = False,
) -> None:
    """Abort a running rebuild: before stop nothing changes; after stop the old disk is put back.

    Refused once the new disk is in place and verified (cleanup). Exit 0 accepted, 1 refused.

    Example: rebuild abort web-1 --host kvm-07 --reason "wrong image"
    """
    try:
        request = StrictAbortRequest(reason=reason, requested_by=requested_by)
    except ValidationError as exc:
        err.print(f"rebuild: invalid abort: {validation_problems(exc)}", markup=False)
        leave(EXIT_BAD_INPUT)
    _run(_abort(instance, host, request, address, as_json))


async def _abort(instance: str, host: str, request: AbortRequest, address: str | None, as_json: bool) -> int:
    client = await connect(address)
    answer = await abort_rebuild(client, instance, host, request)
    if as_json:
        print(answer.model_dump_json())
    elif answer.accepted:
        phase = answer.phase.value
        out.print(f"abort accepted in phase {phase}; see: rebuild status {instance} --host {host}")
    else:
        err.print(f"rebuild: abort refused: {answer.message}", markup=False)
    return EXIT_REBUILT if answer.accepted else EXIT_FAILED


def _decision_command(verdict: str, summary: str) -> None:
    """approve, confirm and revert: one signal each, the same options."""

    def command(
        instance: Annotated[str, typer.Argument(help="libvirt domain name of the instance.")],
        reason: Annotated[str, typer.Option(help="Why, recorded in the workflow.")] = "",
        host: HostOption = THIS_HOST,
        requested_by: Annotated[str, typer.Option(help="Who decides.")] = os.environ.get("USER", "unknown"),
        address: AddressOption = None,
        as_json: JsonOption = False,
    ) -> None:
        try:
            decision = StrictDecision(reason=reason, requested_by=requested_by)
        except ValidationError as exc:
            err.print(f"rebuild: invalid {verdict}: {validation_problems(exc)}", markup=False)
            leave(EXIT_BAD_INPUT)
        _run(_signal(instance, host, verdict, decision, address, as_json))

    command.__doc__ = f"{summary}\n\nExample: rebuild {verdict} web-1 --host kvm-07"
    app.command(verdict, epilog=EXIT_CODES_HELP)(command)


_decision_command(
    "approve", "Approve a rebuild started with --require-approval: it may now stop the instance."
)
_decision_command("confirm", "Keep the new disk of a rebuild in its confirm window; the old one is removed.")
_decision_command("revert", "Put the old disk back during the confirm window; the old image boots again.")


async def _signal(
    instance: str, host: str, verdict: str, decision: Decision, address: str | None, as_json: bool
) -> int:
    client = await connect(address)
    workflow_id = await send_decision(client, instance, host, verdict, decision)
    if as_json:
        print(json.dumps({"workflow_id": workflow_id, "signal": verdict}))
    else:
        out.print(f"sent {verdict} to {workflow_id}; see: rebuild status {instance} --host {host}")
    return EXIT_REBUILT


@app.command("list", epilog=EXIT_CODES_HELP)
def list_command(
    phase: Annotated[
        str | None, typer.Option(help="Only rebuilds in this phase (e.g. stop, await-approval).")
    ] = None,
    host: Annotated[str | None, typer.Option(help="Only rebuilds on this hypervisor.")] = None,
    running: Annotated[bool, typer.Option("--running", help="Only rebuilds still running.")] = False,
    limit: Annotated[int, typer.Option(help="At most this many, newest first.")] = 50,
    address: AddressOption = None,
    as_json: JsonOption = False,
) -> None:
    """List rebuilds through Temporal's visibility (search attributes), newest first.

    Example: rebuild list --phase await-approval --running
    """
    try:
        query = list_query(phase, host, running)
    except BadFilter as exc:
        err.print(f"rebuild: {exc}", markup=False)
        leave(EXIT_BAD_INPUT)
    _run(_list(query, limit, address, as_json))


async def _list(query: str, limit: int, address: str | None, as_json: bool) -> int:
    client = await connect(address)
    rows = await list_rebuilds(client, query, limit)
    if as_json:
        print(json.dumps([row.model_dump() for row in rows]))
        return EXIT_REBUILT
    table = Table("instance", "host", "phase", "status", "started", box=None)
    for row in rows:
        table.add_row(str(row.instance), str(row.host), str(row.phase), str(row.status), row.started)
    out.print(table)
    return EXIT_REBUILT


cache_app = typer.Typer(
    no_args_is_help=True,
    help="The host's image cache (run on the hypervisor host itself, next to its worker).",
    epilog=EXIT_CODES_HELP,
)
app.add_typer(cache_app, name="cache")
app.add_typer(fleet_app, name="fleet")
StateDirOption = Annotated[
    Path | None,
    typer.Option(
        envvar="REBUILD_STATE_DIR", help="The worker's state directory (default: the worker's default)."
    ),
]
LibvirtOption = Annotated[
    str, typer.Option(envvar="REBUILD_LIBVIRT_URI", help="libvirt URI, to find which instances use an image.")
]


@cache_app.command("list")
def cache_list(
    state_dir: StateDirOption = None,
    libvirt_uri: LibvirtOption = "qemu:///system",
    as_json: JsonOption = False,
) -> None:
    """Cached images: size, last use, and the instances whose disks are backed by them.

    Example: rebuild cache list --state-dir /var/lib/durable-rebuild
    """
    from activities.cache import list_cache
    from activities.state import DEFAULT_STATE_DIR, StateDir

    conn = _open_libvirt(libvirt_uri)
    entries = list_cache(StateDir(state_dir or DEFAULT_STATE_DIR), conn)
    if as_json:
        print(json.dumps([dataclasses.asdict(e) for e in entries]))
        leave(EXIT_REBUILT)
    table = Table("sha256", "size", "last used", "used by", box=None)
    for entry in entries:
        last_used = datetime.fromtimestamp(entry.last_used).strftime("%Y-%m-%d %H:%M")
        table.add_row(entry.sha256[:16], _size(entry.size), last_used, ", ".join(entry.users) or "-")
    out.print(table)
    leave(EXIT_REBUILT)


@cache_app.command("prune")
def cache_prune(
    max_age_days: Annotated[float, typer.Option(help="Remove unused images not used for this long.")] = 7.0,
    max_total_gib: Annotated[
        float | None, typer.Option(help="Then remove least recently used unused images down to this.")
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only say what would go.")] = False,
    state_dir: StateDirOption = None,
    libvirt_uri: LibvirtOption = "qemu:///system",
    as_json: JsonOption = False,
) -> None:
    """Evict unused images by age and total size. An image backing any instance's disk is never removed.

    Example: rebuild cache prune --max-age-days 3 --max-total-gib 100
    """
    from activities.cache import prune_cache
    from activities.state import DEFAULT_STATE_DIR, StateDir

    conn = _open_libvirt(libvirt_uri)
    limit = int(max_total_gib * (1 << 30)) if max_total_gib is not None else None
    report = prune_cache(StateDir(state_dir or DEFAULT_STATE_DIR), conn, max_age_days * 86400, limit, dry_run)
    if as_json:
        print(json.dumps(dataclasses.asdict(report)))
    else:
        verb = "would remove" if dry_run else "removed"
        out.print(
            f"{verb} {len(report.removed)} image(s), {_size(report.freed_bytes)}; "
            f"kept {len(report.kept_in_use)} in use; {report.partials_removed} stale partial download(s)"
        )
    leave(EXIT_REBUILT)


def _open_libvirt(uri: str) -> Any:
    from activities.errors import HypervisorUnavailable
    from activities.libvirt_domain import Libvirt

    conn = Libvirt(uri)
    try:
        conn.connection()
    except HypervisorUnavailable as exc:
        err.print(f"rebuild: {exc.message}", markup=False)
        leave(EXIT_UNAVAILABLE)
    return conn


def _size(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024:
            return f"{size:.0f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


app.callback(epilog=EXIT_CODES_HELP)(connection_options)


def main() -> None:
    as_json = "--json" in sys.argv[1:]
    try:
        # Under --json, usage errors come back here to be shown as JSON too.
        code = app(standalone_mode=not as_json)
    except typer.Exit as exc:
        leave(exc.exit_code)
    except typer.Abort:
        leave(ExitCode.INTERRUPTED)
    except SystemExit as exc:
        leave(exc.code if isinstance(exc.code, int) else EXIT_BAD_INPUT)
    except Exception as exc:
        # typer's usage errors (its vendored click's) carry an exit code and a message.
        exit_code, describe = getattr(exc, "exit_code", None), getattr(exc, "format_message", None)
        if not (as_json and isinstance(exit_code, int) and callable(describe)):
            raise
        print(json.dumps({"error": describe(), "exit_code": exit_code}))
        leave(exit_code)
    leave(code if isinstance(code, int) else EXIT_REBUILT)
