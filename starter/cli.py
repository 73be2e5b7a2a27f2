"""``rebuild``: the operator's command line, and ``rebuild start``.

Every command group shares one context (``starter/cli_context.py``: output, JSON mode, errors, exit
codes from :mod:`common.exit_codes`, shown in ``--help``). The groups: ``rebuild start`` here;
``status``, ``watch``, ``abort``, ``approve``, ``confirm``, ``revert``, ``list`` in
``starter/steer_cli.py``; ``rebuild cache`` in ``starter/cache_cli.py``; ``rebuild fleet`` in
``starter/fleet_cli.py``. This CLI talks to Temporal only; the ``cache`` commands, which run on a
hypervisor host, load libvirt and the cache code when they are used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

import typer

from common.exit_codes import ExitCode, leave
from starter import rebuild_options as ro
from starter import steer_cli
from starter.cache_cli import cache_app
from starter.cli_context import (
    EXIT_CODES_HELP,
    AddressOption,
    Cli,
    JsonOption,
    command,
    command_group,
    exit_for_rebuild,
)
from starter.cli_settings import THIS_HOST, HostOption, connection_options
from starter.fleet_cli import fleet_app
from starter.snapshot_cli import snapshot_app

if TYPE_CHECKING:  # temporalio and the models load when a command runs, not for every --help
    from temporalio.client import WorkflowHandle

    from workflows.models import RebuildRequest, RebuildResult

app = command_group(
    "Rebuild KVM/libvirt instances durably: a fresh root disk from a new image, or the old one back."
)


@command(app)
def start(
    ctx: typer.Context,
    instance: Annotated[str, typer.Argument(help="libvirt domain name of the instance.")],
    image: ro.ImageOption = None,
    sha256: ro.Sha256Option = None,
    sha512: ro.Sha512Option = None,
    checksum: ro.ChecksumOption = None,
    disk_format: ro.DiskFormatOption = None,
    glance: ro.GlanceOption = None,
    glance_image: ro.GlanceImageOption = None,
    snapshot: Annotated[
        str | None,
        typer.Option(
            metavar="ID",
            rich_help_panel=ro.IMAGE_PANEL,
            help="A snapshot on the instance's host (rebuild snapshot list).",
        ),
    ] = None,
    host: HostOption = THIS_HOST,
    wait: Annotated[bool, typer.Option("--wait", help="Wait for the result and show progress.")] = False,
    start_after: ro.StartAfterOption = None,
    stop_timeout: ro.StopTimeoutOption = 60.0,
    boot_marker: ro.BootMarkerOption = None,
    boot_timeout: ro.BootTimeoutOption = 120.0,
    verify: ro.VerifyOption = None,
    preflight: ro.PreflightOption = None,
    require_approval: ro.RequireApprovalOption = False,
    approval_timeout: ro.ApprovalTimeoutOption = 3600.0,
    confirm_within: ro.ConfirmWithinOption = None,
    revert_by_default: ro.RevertByDefaultOption = False,
    requested_by: ro.RequestedByOption = ro.REQUESTED_BY,
    ssh_key: ro.SshKeyOption = None,
    no_ssh_keys: ro.NoSshKeysOption = False,
    user_data: ro.UserDataOption = None,
    no_user_data: ro.NoUserDataOption = False,
    hostname: ro.HostnameOption = None,
    name: ro.NameOption = None,
    description: ro.DescriptionOption = None,
    metadata: ro.MetadataOption = None,
    no_metadata: ro.NoMetadataOption = False,
    admin_password_file: ro.AdminPasswordFileOption = None,
    seed_format: ro.SeedFormatOption = None,
    disk_mode: ro.DiskModeOption = None,
    root_disk: ro.RootDiskOption = None,
    discard_snapshots: ro.DiscardSnapshotsOption = False,
    address: AddressOption = None,
    as_json: JsonOption = False,
) -> None:
    """Start a rebuild of INSTANCE from --image, --glance-image, --snapshot or its current image.

    No image named: the one its metadata records, with its digest (as `openstack server rebuild`).

    Identity options follow Nova's rebuild: one not given keeps the instance's value, --no-... removes it.

    Example: rebuild start web-1 --image https://images.example/noble.qcow2 --sha256 HEX --wait
    """
    from starter.identity_options import identity_change
    from workflows.models import StrictRebuildRequest

    cli = Cli.of(ctx)
    with cli.refusing("request"):
        sha256, sha512 = ro.digests(checksum, sha256, sha512)
        request = StrictRebuildRequest(
            instance=instance,
            host=host,
            image_url=image,
            sha256=sha256,
            sha512=sha512,
            disk_format=disk_format,
            glance_url=glance,
            glance_image_id=glance_image,
            snapshot_id=snapshot,
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
            disk_mode=disk_mode,
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
                seed_format=ro.seed_format_of(seed_format),
            ),
        )
    cli.run(_start(cli, request, wait, address))


async def _start(cli: Cli, request: RebuildRequest, wait: bool, address: str | None) -> int:
    from common.connection import connect
    from starter.rebuilds import start_rebuild, wait_past_inspect

    client = await connect(address)
    handle = await start_rebuild(client, request)
    if wait:
        with cli.following(request.instance, request.host, handle.id):
            return await _wait(cli, handle)
    # Past inspect, or it failed there: a wrong name or an unsupported root disk is exit 2 now.
    phase = await wait_past_inspect(handle)
    if phase is None:
        return await _ended(cli, handle)
    if cli.json:
        cli.print_json({"workflow_id": handle.id, "run_id": handle.result_run_id, "phase": phase.value})
    else:
        cli.say(
            f"started rebuild of {request.instance} on {request.host}: workflow {handle.id}, "
            f"phase {phase.value}; see: rebuild watch {request.instance} --host {request.host}"
        )
    return ExitCode.OK


def _ended_as(cause: BaseException) -> str:
    """How a failure's cause names the way the workflow ended, in the words of its status."""
    from temporalio.exceptions import CancelledError, TerminatedError, TimeoutError

    ended_as = ((TerminatedError, "TERMINATED"), (CancelledError, "CANCELED"), (TimeoutError, "TIMED_OUT"))
    return next((name for kind, name in ended_as if isinstance(cause, kind)), "FAILED")


async def _wait(cli: Cli, handle: WorkflowHandle[Any, RebuildResult]) -> int:
    import asyncio

    watcher = asyncio.create_task(_show_phases(cli, handle))
    try:
        return await _ended(cli, handle)
    finally:
        watcher.cancel()


async def _ended(cli: Cli, handle: WorkflowHandle[Any, RebuildResult]) -> int:
    """The rebuild's end as its result says it, and the exit code for it."""
    from temporalio.client import WorkflowFailureError
    from temporalio.exceptions import ApplicationError

    from workflows.results import failure_result

    try:
        rebuilt = await handle.result()
    except WorkflowFailureError as failure:
        outcome = failure_result(failure.cause)
        ended = _ended_as(failure.cause)
        code = exit_for_rebuild(ended, outcome)
        if cli.json and outcome is not None:
            cli.print_json(outcome)
        else:
            message = failure.cause.message if isinstance(failure.cause, ApplicationError) else failure.cause
            cli.error(code, str(message))
        return code
    if cli.json:
        cli.print_json(rebuilt)
    else:
        _print_result(cli, rebuilt)
    return ExitCode.OK


async def _show_phases(cli: Cli, handle: WorkflowHandle[Any, Any]) -> None:
    import asyncio

    from temporalio.service import RPCError

    from starter.rebuilds import query_status

    seen = None
    while True:
        try:
            status = await query_status(handle)
            if status.phase != seen and not cli.json:
                cli.err.print(f"  phase: {status.phase.value}", markup=False)
                seen = status.phase
        except RPCError:
            pass
        await asyncio.sleep(0.3)


def _print_result(cli: Cli, result: RebuildResult) -> None:
    cli.say(f"rebuilt {result.instance} on {result.host}: image sha256 {result.image_sha256}")
    timings = ", ".join(f"{step} {seconds:.2f}s" for step, seconds in result.step_seconds.items())
    cli.say(f"  steps: {timings}")
    if result.downtime_seconds is not None:
        forced = " (forced off after the graceful timeout)" if result.forced_stop else ""
        cli.say(f"  downtime: {result.downtime_seconds:.2f}s{forced}")
    if result.stopped_by is not None:
        cli.say(f"  stopped by: {result.stopped_by}")
    if result.verified_by is not None:
        cli.say(f"  verified by: {result.verified_by}")
    if result.disk_mode is not None:
        cli.say(f"  disk mode: {result.disk_mode}")


steer_cli.register(app)
app.add_typer(cache_app, name="cache")
app.add_typer(fleet_app, name="fleet")
app.add_typer(snapshot_app, name="snapshot")
app.callback(epilog=EXIT_CODES_HELP)(connection_options)


def main() -> None:
    """Run ``rebuild``; every way out goes through :func:`common.exit_codes.leave`."""
    try:
        app(obj=Cli())
    except SystemExit as exc:
        # Typer's own endings: --help, --version, a usage error it rendered as text.
        leave(exc.code if isinstance(exc.code, int) else ExitCode.BAD_INPUT)
    leave(ExitCode.OK)
