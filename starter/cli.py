"""``rebuild``: the operator's command line, and ``rebuild start``.

Every command group shares one context (``starter/cli_context.py``: output, JSON mode, errors, exit
codes from :mod:`common.exit_codes`, shown in ``--help``). The groups: ``rebuild start`` here;
``status``, ``watch``, ``abort``, ``approve``, ``confirm``, ``revert``, ``list`` in
``starter/steer_cli.py``; ``rebuild instances`` in ``starter/instances_cli.py``; ``rebuild cache`` in
``starter/cache_cli.py``; ``rebuild fleet`` in
``starter/fleet_cli.py``. This CLI talks to Temporal only; the ``cache`` commands, which run on a
hypervisor host, load libvirt and the cache code when they are used.
"""

from __future__ import annotations

from typing import Annotated

import typer

from common.exit_codes import ExitCode, leave
from starter import instances_cli, steer_cli
from starter import rebuild_options as ro
from starter.cache_cli import cache_app
from starter.cli_context import (
    EXIT_CODES_HELP,
    AddressOption,
    Cli,
    JsonOption,
    command,
    command_group,
)
from starter.cli_settings import HOST_TO_BE_FOUND, FoundHostOption, connection_options
from starter.fleet_cli import fleet_app
from starter.snapshot_cli import snapshot_app

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
    host: FoundHostOption = None,
    wait: Annotated[bool, typer.Option("--wait", help="Wait for the result and show progress.")] = False,
    dry_run: ro.DryRunOption = False,
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
    # temporalio and the models load when the command runs, not for every --help.
    from starter.identity_options import identity_change
    from starter.start_run import run_start
    from workflows.models import StrictRebuildRequest

    cli = Cli.of(ctx)
    with cli.refusing("request"):
        sha256, sha512 = ro.digests(checksum, sha256, sha512)
        request = StrictRebuildRequest(
            instance=instance,
            host=host or HOST_TO_BE_FOUND,
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
            dry_run=dry_run,
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
    cli.run(run_start(cli, request, wait, address, find_host=host is None))


steer_cli.register(app)
instances_cli.register(app)
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
