"""``rebuild cache list | prune``: the host's image cache, run on the hypervisor host itself.

The only commands that load libvirt and the cache code, and only when they run: the rest of the CLI
talks to Temporal alone (``tests/test_layout.py``).
"""

from __future__ import annotations

import dataclasses
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from common.exit_codes import ExitCode, leave
from starter.cli_context import Cli, JsonOption, command, command_group

if TYPE_CHECKING:  # the cache commands load libvirt only when they run
    from activities.libvirt_domain import Libvirt

cache_app = command_group("The host's image cache (run on the hypervisor host itself, next to its worker).")
StateDirOption = Annotated[
    Path | None,
    typer.Option(
        envvar="REBUILD_STATE_DIR",
        metavar="DIR",
        help="The worker's state directory (default: the worker's, /var/lib/durable-rebuild).",
    ),
]
LibvirtOption = Annotated[
    str, typer.Option(envvar="REBUILD_LIBVIRT_URI", help="libvirt URI, to find which instances use an image.")
]


@command(cache_app, "list", epilog=None)
def cache_list(
    ctx: typer.Context,
    state_dir: StateDirOption = None,
    libvirt_uri: LibvirtOption = "qemu:///system",
    as_json: JsonOption = False,
) -> None:
    """Cached images: size, last use, and the instances whose disks are backed by them.

    Example: rebuild cache list --state-dir /var/lib/durable-rebuild
    """
    from rich.table import Table

    from activities.cache import list_cache
    from activities.state import DEFAULT_STATE_DIR, StateDir

    cli = Cli.of(ctx)
    state = StateDir(state_dir or DEFAULT_STATE_DIR)
    entries = list_cache(state, _open_libvirt(cli, libvirt_uri))
    if cli.json:
        cli.print_json([dataclasses.asdict(e) for e in entries])
        leave(ExitCode.OK)
    cli.say(_which_state_dir(state.root, state_dir is None))
    if not entries:
        cli.say(f"no cached images in {state.images}")
        leave(ExitCode.OK)
    table = Table("sha256", "where", "size", "last used", "used by", box=None)
    for entry in entries:
        last_used = datetime.fromtimestamp(entry.last_used).strftime("%Y-%m-%d %H:%M")
        users = ", ".join(entry.users) or "-"
        table.add_row(entry.sha256[:16], entry.where, size_text(entry.size), last_used, users)
    cli.out.print(table)
    leave(ExitCode.OK)


@command(cache_app, "prune", epilog=None)
def cache_prune(
    ctx: typer.Context,
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

    cli = Cli.of(ctx)
    conn = _open_libvirt(cli, libvirt_uri)
    limit = int(max_total_gib * (1 << 30)) if max_total_gib is not None else None
    state = StateDir(state_dir or DEFAULT_STATE_DIR)
    report = prune_cache(state, conn, max_age_days * 86400, limit, dry_run)
    if cli.json:
        cli.print_json(dataclasses.asdict(report))
    else:
        cli.say(_which_state_dir(state.root, state_dir is None))
        verb = "would remove" if dry_run else "removed"
        cli.say(
            f"{verb} {len(report.removed)} image(s), {size_text(report.freed_bytes)}; "
            f"kept {len(report.kept_in_use)} in use; {report.partials_removed} stale partial download(s)"
        )
    leave(ExitCode.OK)


def _which_state_dir(root: Path, by_default: bool) -> str:
    """Which worker's cache this is: an empty table from another directory must not look like none."""
    how = (
        "the worker's default; --state-dir or REBUILD_STATE_DIR names another"
        if by_default
        else "--state-dir or REBUILD_STATE_DIR"
    )
    missing = "" if root.is_dir() else "; it does not exist: is the worker's --state-dir another?"
    return f"state directory: {root} ({how}){missing}"


def _open_libvirt(cli: Cli, uri: str) -> Libvirt:
    from activities.errors import HypervisorUnavailable
    from activities.libvirt_domain import Libvirt

    conn = Libvirt(uri)
    try:
        conn.connection()
    except HypervisorUnavailable as exc:
        cli.fail(ExitCode.UNAVAILABLE, exc.message)
    return conn


def size_text(size: float) -> str:
    """A byte count as people read it (``rebuild cache`` and a dry run's plan)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024:
            return f"{size:.0f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"
