"""``rebuild``: the operator's command line, and ``rebuild start``.

Every command group shares one context (``starter/cli_context.py``: output, JSON mode, errors, exit
codes from :mod:`common.exit_codes`, shown in ``--help``). The groups: ``rebuild start`` here;
``status``, ``watch``, ``abort``, ``approve``, ``confirm``, ``revert``, ``list`` in
``starter/steer_cli.py``; ``rebuild cache`` in ``starter/cache_cli.py``; ``rebuild fleet`` in
``starter/fleet_cli.py``. This CLI talks to Temporal only; the ``cache`` commands, which run on a
hypervisor host, load libvirt and the cache code when they are used.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Annotated, Any

import typer
from temporalio.client import WorkflowFailureError, WorkflowHandle
from temporalio.exceptions import ApplicationError, CancelledError, TerminatedError, TimeoutError
from temporalio.service import RPCError

from common.connection import connect
from common.exit_codes import ExitCode, leave
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
from starter.identity_options import IdentityOptionError, identity_change
from starter.rebuilds import query_status, start_rebuild, wait_past_inspect
from starter.snapshot_cli import snapshot_app
from workflows.identity import SeedFormat
from workflows.models import RebuildRequest, RebuildResult, StrictRebuildRequest
from workflows.results import failure_result

app = command_group(
    "Rebuild KVM/libvirt instances durably: a fresh root disk from a new image, or the old one back."
)


@command(app)
def start(
    ctx: typer.Context,
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
    snapshot: Annotated[
        str | None, typer.Option(help="ID of a snapshot on the instance's host (rebuild snapshot list).")
    ] = None,
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
            "the mode, the running root disk must be the new disk this rebuild made."
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
    disk_mode: Annotated[
        str | None,
        typer.Option(
            help="A file root disk's new disk: overlay (a qcow2 overlay on the cached image, constant "
            "time) or copy (a standalone disk in the old disk's format, raw stays raw: a reflink where "
            "the file system has them, else a full copy, made before the stop). Default: the host "
            "worker's --disk-mode."
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
    """Start a rebuild of INSTANCE from --image, --glance-image or --snapshot.

    Identity options follow Nova's rebuild: one not given keeps the instance's value, --no-... removes it.

    Example: rebuild start web-1 --image https://images.example/noble.qcow2 --sha256 HEX --wait
    """
    cli = Cli.of(ctx)
    with cli.refusing("request"):
        if checksum is not None:
            algo, _, value = checksum.partition(":")
            if algo.lower() not in ("sha256", "sha512") or not value:
                cli.fail(ExitCode.BAD_INPUT, f"--checksum must be sha256:HEX or sha512:HEX, not {checksum!r}")
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
                seed_format=_seed_format(seed_format),
            ),
        )
    cli.run(_start(cli, request, wait, address))


def _seed_format(value: str | None) -> SeedFormat | None:
    if value is None:
        return None
    if value not in ("nocloud", "config-drive"):
        raise IdentityOptionError(f"--seed-format must be nocloud or config-drive, not {value!r}")
    return "nocloud" if value == "nocloud" else "config-drive"


async def _start(cli: Cli, request: RebuildRequest, wait: bool, address: str | None) -> int:
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


# How a failure's cause names the way the workflow ended, in the words of its status.
_ENDED_AS = ((TerminatedError, "TERMINATED"), (CancelledError, "CANCELED"), (TimeoutError, "TIMED_OUT"))


async def _wait(cli: Cli, handle: WorkflowHandle[Any, RebuildResult]) -> int:
    watcher = asyncio.create_task(_show_phases(cli, handle))
    try:
        return await _ended(cli, handle)
    finally:
        watcher.cancel()


async def _ended(cli: Cli, handle: WorkflowHandle[Any, RebuildResult]) -> int:
    """The rebuild's end as its result says it, and the exit code for it."""
    try:
        rebuilt = await handle.result()
    except WorkflowFailureError as failure:
        outcome = failure_result(failure.cause)
        ended = next((name for kind, name in _ENDED_AS if isinstance(failure.cause, kind)), "FAILED")
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
