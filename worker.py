"""The process that runs on each hypervisor host.

It polls the shared workflow queue and its own host queue: every activity of a rebuild is sent to the
queue of the instance's host, so disk work always runs where the disk is.

With ``--build-id`` the worker joins a Worker Deployment (Temporal's Worker Versioning): every rebuild
is pinned to the version of the worker that started it, so a fleet rolls out new workflow code while
rebuilds already running finish on the old one (see docs/operations.md, Versioning).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any

import typer
from temporalio.client import Client
from temporalio.common import VersioningBehavior, WorkerDeploymentVersion
from temporalio.worker import Worker, WorkerDeploymentConfig

from activities.boot_check import BootCheck
from activities.checkpoints import Checkpoints
from activities.cleanup import CleanupActivities
from activities.disks import DiskActivities
from activities.glance import GlanceActivities, GlanceConfigError, GlanceEndpoint
from activities.glance_publish import SnapshotPublisher
from activities.hypervisor import HypervisorActivities
from activities.image_fetch import DEFAULT_CACHE_QUOTA_BYTES, DEFAULT_MAX_IMAGE_BYTES
from activities.images import ImageActivities
from activities.inventory import InventoryActivities
from activities.libvirt_domain import Libvirt
from activities.network import AddressPolicy, parse_networks
from activities.preflight import PreflightActivities
from activities.seed import SeedActivities
from activities.snapshots import SnapshotActivities
from activities.state import DEFAULT_STATE_DIR, StateDir
from activities.swap import SwapActivities
from common.codec import CodecKeyError
from common.config_file import run_with_config
from common.connection import TemporalUnavailable, connect, worker_identity
from common.exit_codes import ExitCode
from common.exit_codes import table as exit_code_table
from common.help import HelpCommand
from common.logs import LogFormat, LogLevel, configure_logging
from common.metrics import prometheus_runtime
from common.systemd import notify
from workflows.fleet import FleetRebuild
from workflows.inventory import InstanceInventory
from workflows.models import DISK_MODES, HOST_NAME, WORKFLOW_TASK_QUEUE, host_task_queue
from workflows.rebuild import RebuildInstance
from workflows.snapshot import SNAPSHOT_WORKFLOWS

app = typer.Typer(add_completion=False)
THIS_HOST = socket.gethostname()
DEPLOYMENT_NAME = "durable-rebuild"
GIB = 1 << 30
log = logging.getLogger("rebuild.worker")


@dataclass(frozen=True)
class WorkerConfig:
    host: str
    libvirt_uri: str
    state_dir: Path
    address: str | None = None
    pause_dir: Path | None = None
    download_read_timeout: float = 30.0
    file_image_dir: Path | None = None
    glance: GlanceEndpoint | None = None
    metrics_address: str | None = None
    # Networks beyond the public internet that images may come from (private image servers).
    allowed_image_networks: tuple[str, ...] = ()
    # Worker Versioning: None runs unversioned (every worker takes every workflow task).
    build_id: str | None = None
    deployment_name: str = DEPLOYMENT_NAME
    # Pre-flight: boot each new image in a sandbox first, unless the request says otherwise.
    preflight_by_default: bool = False
    preflight_slots: int = 2
    preflight_max_memory_mib: int = 2048
    # How a file root disk's new disk is made unless the request says: overlay or copy.
    disk_mode: str = "overlay"
    # Whatever a request says: no image larger than this, no more than this in the image cache (None:
    # no quota but the file system's free space). Checked before a download.
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    cache_quota_bytes: int | None = DEFAULT_CACHE_QUOTA_BYTES

    def deployment(self) -> WorkerDeploymentConfig | None:
        """Pinned: a rebuild stays on the code that started it, however long it waits for approval."""
        if self.build_id is None:
            return None
        return WorkerDeploymentConfig(
            version=WorkerDeploymentVersion(deployment_name=self.deployment_name, build_id=self.build_id),
            use_worker_versioning=True,
            default_versioning_behavior=VersioningBehavior.PINNED,
        )


def host_activities(config: WorkerConfig, conn: Libvirt | None = None) -> list[Callable[..., Any]]:
    """Every activity a host runs, wired to that host's libvirt and state directory."""
    conn = conn or Libvirt(config.libvirt_uri)
    state = StateDir(config.state_dir)
    state.create()
    checkpoints = Checkpoints(config.pause_dir)
    policy = AddressPolicy(parse_networks(config.allowed_image_networks))
    disks = DiskActivities(conn, state, checkpoints, default_disk_mode=config.disk_mode)
    hypervisor = HypervisorActivities(
        conn,
        checkpoints,
        preflight_by_default=config.preflight_by_default,
        boot_check=BootCheck(conn, disks.root_disks),
        state=state,
        swaps_in_one_step=True,
        cleans_up_in_one_step=True,
    )
    images = ImageActivities(
        state,
        checkpoints,
        read_timeout_seconds=config.download_read_timeout,
        file_image_dir=config.file_image_dir,
        glance=config.glance,
        address_policy=policy,
        max_image_bytes=config.max_image_bytes,
        cache_quota_bytes=config.cache_quota_bytes,
    )
    glance = GlanceActivities(config.glance, policy)
    seed = SeedActivities(conn, state)
    preflight = preflight_activities(config, conn)
    snapshots = SnapshotActivities(conn, state, config.host, checkpoints)
    return [
        hypervisor.inspect_instance,
        hypervisor.stop_instance,
        hypervisor.start_instance,
        hypervisor.verify_instance,
        hypervisor.record_image,
        glance.resolve_glance_image,
        images.fetch_image,
        images.check_image,
        disks.stage_root_disk,
        disks.plan_root_disk,
        disks.discard_staged_root_disk,
        disks.prepare_root_disk,
        SwapActivities(hypervisor, disks).swap_root_disk,
        CleanupActivities(hypervisor, disks).clean_up_rebuild,
        disks.restore_root_disk,
        disks.remove_backup,
        seed.prepare_seed,
        seed.restore_seed,
        seed.remove_seed_backup,
        preflight.preflight_image,
        InventoryActivities(conn).list_instances,
        snapshots.take_snapshot,
        snapshots.discard_snapshot,
        snapshots.resolve_snapshot,
        snapshots.prune_snapshots,
        snapshots.snapshot_catalog,
        SnapshotPublisher(state, config.glance, policy).publish_snapshot,
    ]


def preflight_activities(config: WorkerConfig, conn: Libvirt | None = None) -> PreflightActivities:
    conn = conn or Libvirt(config.libvirt_uri)
    return PreflightActivities(
        conn,
        StateDir(config.state_dir),
        BootCheck(conn),
        max_sandboxes=config.preflight_slots,
        max_memory_mib=config.preflight_max_memory_mib,
        checkpoints=Checkpoints(config.pause_dir),
    )


# How often a running step's heartbeat (the download's bytes) reaches Temporal: the SDK's default, 80 %
# of the heartbeat timeout (8 s), left `rebuild watch` showing a 13 s download in two jumps.
HEARTBEAT_THROTTLE = timedelta(seconds=2)


def build_workers(client: Client, config: WorkerConfig) -> list[Worker]:
    # The identity names the host: `rebuild start` lists the hosts that have a worker from it.
    identity = worker_identity(config.host)
    deployment = config.deployment()
    return [
        Worker(
            client,
            task_queue=WORKFLOW_TASK_QUEUE,
            workflows=[RebuildInstance, FleetRebuild, InstanceInventory, *SNAPSHOT_WORKFLOWS],
            identity=identity,
            deployment_config=deployment,
        ),
        Worker(
            client,
            task_queue=host_task_queue(config.host),
            activities=host_activities(config),
            max_concurrent_activities=200,
            max_heartbeat_throttle_interval=HEARTBEAT_THROTTLE,
            identity=identity,
            deployment_config=deployment,
        ),
    ]


async def serve(config: WorkerConfig) -> None:
    runtime = prometheus_runtime(config.metrics_address, config.host) if config.metrics_address else None
    client = await connect(config.address, runtime=runtime)
    swept = await asyncio.to_thread(preflight_activities(config).sweep)
    if swept:
        log.warning("removed pre-flight sandboxes left by a crashed worker: %s", ", ".join(swept))
    workers = build_workers(client, config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with workers[0], workers[1]:
        version = f" version={config.deployment_name}.{config.build_id}" if config.build_id else ""
        log.info(
            "worker ready: host=%s queues=%s,%s libvirt=%s state=%s%s",
            config.host,
            WORKFLOW_TASK_QUEUE,
            host_task_queue(config.host),
            config.libvirt_uri,
            config.state_dir,
            version,
            extra={"host": config.host, "metrics": config.metrics_address},
        )
        notify("READY=1", f"STATUS=polling {host_task_queue(config.host)}")
        await stop.wait()
        notify("STOPPING=1", "STATUS=finishing the running activities")


# The panels of `rebuild-worker --help`.
HOST_PANEL = "This host"
IMAGES_PANEL = "Where images may come from"
GLANCE_PANEL = "Glance"
DEFAULTS_PANEL = "Defaults for the rebuilds on this host (a request may say otherwise)"
VERSIONING_PANEL = "Worker Versioning"
SANDBOX_PANEL = "Pre-flight sandboxes"


@app.command(cls=HelpCommand, epilog="Exit codes (every command):\n\n" + exit_code_table())
def run(
    host: Annotated[
        str,
        typer.Option(
            envvar="REBUILD_HOST",
            help="This hypervisor's name; the worker polls rebuild-host-NAME.",
            rich_help_panel=HOST_PANEL,
        ),
    ] = THIS_HOST,
    libvirt_uri: Annotated[
        str,
        typer.Option(
            envvar="REBUILD_LIBVIRT_URI",
            help="libvirt connection URI.",
            rich_help_panel=HOST_PANEL,
        ),
    ] = "qemu:///system",
    state_dir: Annotated[
        Path,
        typer.Option(
            envvar="REBUILD_STATE_DIR",
            help="Image cache and state.",
            rich_help_panel=HOST_PANEL,
        ),
    ] = DEFAULT_STATE_DIR,
    address: Annotated[
        str | None,
        typer.Option(
            envvar="TEMPORAL_ADDRESS",
            help="Temporal address (default: envconfig, localhost:7233).",
            rich_help_panel=HOST_PANEL,
        ),
    ] = None,
    download_read_timeout: Annotated[
        float,
        typer.Option(
            envvar="REBUILD_DOWNLOAD_READ_TIMEOUT",
            help="Seconds without a byte before a download is declared stalled.",
            rich_help_panel=IMAGES_PANEL,
            metavar="SECONDS",
        ),
    ] = 30.0,
    file_image_dir: Annotated[
        Path | None,
        typer.Option(
            envvar="REBUILD_FILE_IMAGE_DIR",
            help="Directory file:// images may come from (default: none allowed).",
            rich_help_panel=IMAGES_PANEL,
            metavar="DIR",
        ),
    ] = None,
    glance_url: Annotated[
        str | None,
        typer.Option(
            envvar="REBUILD_GLANCE_URL",
            help="The Glance endpoint this worker's token belongs to, e.g. https://glance:9292.",
            rich_help_panel=GLANCE_PANEL,
            metavar="URL",
        ),
    ] = None,
    glance_token_file: Annotated[
        Path | None,
        typer.Option(
            envvar="REBUILD_GLANCE_TOKEN_FILE",
            help="File holding a Keystone token for --glance-url; re-read when it changes, never sent "
            "to any other URL or along a redirect.",
            rich_help_panel=GLANCE_PANEL,
            metavar="FILE",
        ),
    ] = None,
    glance_allow_http: Annotated[
        bool,
        typer.Option(
            "--glance-allow-http",
            envvar="REBUILD_GLANCE_ALLOW_HTTP",
            help="Accept a plain-http Glance endpoint (its token crosses in clear).",
            rich_help_panel=GLANCE_PANEL,
        ),
    ] = False,
    allow_image_network: Annotated[
        list[str] | None,
        typer.Option(
            envvar="REBUILD_ALLOW_IMAGE_NETWORK",
            help="A network (CIDR) images may come from besides public addresses, e.g. 10.0.5.0/24 for "
            "a private image server; repeatable. Loopback, link-local (metadata) and private "
            "networks are refused unless allowed here.",
            rich_help_panel=IMAGES_PANEL,
            metavar="CIDR",
        ),
    ] = None,
    metrics: Annotated[
        str | None,
        typer.Option(
            envvar="REBUILD_METRICS_ADDRESS",
            help="Serve Prometheus metrics at this address, e.g. 0.0.0.0:9464.",
            rich_help_panel=HOST_PANEL,
            metavar="HOST:PORT",
        ),
    ] = None,
    preflight: Annotated[
        bool,
        typer.Option(
            "--preflight/--no-preflight",
            envvar="REBUILD_PREFLIGHT",
            help="Boot each new image in a sandbox before stopping the instance, unless a request "
            "says otherwise (rebuild start --preflight or --no-preflight).",
            rich_help_panel=DEFAULTS_PANEL,
        ),
    ] = False,
    preflight_slots: Annotated[
        int,
        typer.Option(
            min=1,
            max=64,
            envvar="REBUILD_PREFLIGHT_SLOTS",
            help="Pre-flight sandboxes at most at once on this host.",
            rich_help_panel=SANDBOX_PANEL,
            metavar="N",
        ),
    ] = 2,
    preflight_max_memory: Annotated[
        int,
        typer.Option(
            envvar="REBUILD_PREFLIGHT_MAX_MEMORY",
            min=64,
            help="Memory cap of a pre-flight sandbox, MiB.",
            rich_help_panel=SANDBOX_PANEL,
            metavar="MIB",
        ),
    ] = 2048,
    disk_mode: Annotated[
        str,
        typer.Option(
            envvar="REBUILD_DISK_MODE",
            help="How a file root disk's new disk is made, unless a request says (rebuild start "
            "--disk-mode): overlay (a qcow2 overlay on the cached image, constant time) or copy (a "
            "standalone disk in the old disk's format: a reflink where the file system has them, "
            "else a full copy, made before the stop).",
            rich_help_panel=DEFAULTS_PANEL,
            metavar="MODE",
        ),
    ] = "overlay",
    max_image_gib: Annotated[
        float,
        typer.Option(
            envvar="REBUILD_MAX_IMAGE_GIB",
            min=0.001,
            help="No image larger than this is downloaded, whatever a request's limit says; checked "
            "before the download (and as bytes come when a server does not say the size).",
        ),
    ] = DEFAULT_MAX_IMAGE_BYTES / GIB,
    cache_quota_gib: Annotated[
        float,
        typer.Option(
            envvar="REBUILD_CACHE_QUOTA_GIB",
            min=0,
            help="The image cache (images and partial downloads) holds at most this much; an image "
            "that would pass it is refused before its download (rebuild cache prune frees room). "
            "0: no quota but the file system's free space.",
        ),
    ] = DEFAULT_CACHE_QUOTA_BYTES / GIB,
    log_format: Annotated[
        LogFormat,
        typer.Option(
            envvar="REBUILD_LOG_FORMAT",
            help="text for a terminal, json for a pipeline.",
            rich_help_panel=HOST_PANEL,
        ),
    ] = LogFormat.TEXT,
    log_level: Annotated[
        LogLevel, typer.Option(envvar="REBUILD_LOG_LEVEL", help="The least severe level logged.")
    ] = LogLevel.INFO,
    pause_dir: Annotated[
        Path | None,
        # A test hook: not in the production --help.
        typer.Option(envvar="REBUILD_PAUSE_DIR", hidden=True, help="Pause activities at named points."),
    ] = None,
    build_id: Annotated[
        str | None,
        typer.Option(
            envvar="REBUILD_BUILD_ID",
            help="Join Worker Versioning as this build of --deployment-name (rebuilds are pinned to it); "
            "default: unversioned.",
            rich_help_panel=VERSIONING_PANEL,
            metavar="ID",
        ),
    ] = None,
    deployment_name: Annotated[
        str,
        typer.Option(
            envvar="REBUILD_DEPLOYMENT_NAME",
            help="Worker Deployment this worker's build belongs to.",
            rich_help_panel=VERSIONING_PANEL,
            metavar="NAME",
        ),
    ] = DEPLOYMENT_NAME,
    config_file: Annotated[
        Path | None,
        typer.Option(
            "--config",
            envvar="REBUILD_WORKER_CONFIG",
            help="A TOML file of these options, named as here without the dashes (state-dir = "
            '"/srv/rebuild"); the command line and the environment win over it.',
        ),
    ] = None,
) -> None:
    """Run the rebuild worker for this hypervisor host."""
    del config_file  # read before the options were parsed: its settings are their defaults
    configure_logging(log_format, log_level)
    if not HOST_NAME.fullmatch(host):
        print(f"rebuild-worker: not a usable host name: {host!r}", file=sys.stderr)
        raise typer.Exit(ExitCode.BAD_INPUT)
    if disk_mode not in DISK_MODES:
        print(
            f"rebuild-worker: --disk-mode must be {' or '.join(DISK_MODES)}, not {disk_mode!r}",
            file=sys.stderr,
        )
        raise typer.Exit(ExitCode.BAD_INPUT)
    networks = tuple(allow_image_network or ())
    try:
        parse_networks(networks)
        glance = _glance_endpoint(glance_url, glance_token_file, glance_allow_http)
    except (ValueError, OSError) as err:
        print(f"rebuild-worker: {err}", file=sys.stderr)
        raise typer.Exit(ExitCode.BAD_INPUT) from None
    config = WorkerConfig(
        host,
        libvirt_uri,
        state_dir,
        address,
        pause_dir,
        download_read_timeout,
        file_image_dir,
        glance,
        metrics,
        networks,
        build_id,
        deployment_name,
        preflight,
        preflight_slots,
        preflight_max_memory,
        disk_mode,
        max_image_bytes=int(max_image_gib * GIB),
        cache_quota_bytes=int(cache_quota_gib * GIB) or None,
    )
    try:
        asyncio.run(serve(config))
    except TemporalUnavailable as err:
        log.error("rebuild-worker: %s", err)
        os._exit(ExitCode.UNAVAILABLE)
    except CodecKeyError as err:
        log.error("rebuild-worker: %s", err)
        os._exit(ExitCode.BAD_INPUT)
    sys.stdout.flush()
    os._exit(ExitCode.OK)


def _glance_endpoint(url: str | None, token_file: Path | None, allow_http: bool) -> GlanceEndpoint | None:
    if url is None:
        if token_file is not None:
            raise GlanceConfigError("--glance-token-file needs --glance-url: a token belongs to one endpoint")
        return None
    if token_file is not None and not os.access(token_file, os.R_OK):
        raise GlanceConfigError(f"Glance token file {token_file} is not readable")
    return GlanceEndpoint(url, token_file, allow_http)


def main() -> None:
    run_with_config(app, "rebuild-worker", "REBUILD_WORKER_CONFIG")


if __name__ == "__main__":
    main()
