"""``rebuild status | watch | abort | approve | confirm | revert | list``: following and steering rebuilds.

Registered on the ``rebuild`` group by :func:`register`, after ``rebuild start`` (``starter/cli.py``).
Output, JSON mode, errors and exit codes come from the command's :class:`~starter.cli_context.Cli`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Annotated, Any

import typer

from common.exit_codes import ExitCode
from starter.cli_context import AddressOption, Cli, JsonOption, command, exit_for_rebuild, exit_for_workflow
from starter.cli_settings import FoundHostOption

if TYPE_CHECKING:  # temporalio and the models load when a command runs, not for every --help
    from temporalio.client import Client, WorkflowHandle

    from workflows.models import AbortRequest, Decision

InstanceArgument = Annotated[str, typer.Argument(help="libvirt domain name of the instance.")]
DECISIONS = {
    "approve": "Approve a rebuild started with --require-approval: it may now stop the instance.",
    "confirm": "Keep the new disk of a rebuild in its confirm window; the old one is removed.",
    "revert": "Put the old disk back during the confirm window; the old image boots again.",
}


def register(app: typer.Typer) -> None:
    """The commands in the order ``rebuild --help`` lists them."""
    command(app, "status")(_instance_command(_status))
    command(app, "watch")(_instance_command(_watch))
    command(app)(abort)
    for verdict, summary in DECISIONS.items():
        command(app, verdict)(_decision_command(verdict, summary))
    command(app, "list")(list_command)


def _instance_command(
    work: Callable[[Cli, str, str | None, str | None], Coroutine[Any, Any, int]],
) -> Callable[..., None]:
    """status and watch: INSTANCE, --host, --address, --json, and the work's docstring as help."""

    def on_instance(
        ctx: typer.Context,
        instance: InstanceArgument,
        host: FoundHostOption = None,
        address: AddressOption = None,
        as_json: JsonOption = False,
    ) -> None:
        cli = Cli.of(ctx)
        cli.run(work(cli, instance, host, address))

    on_instance.__doc__ = work.__doc__
    return on_instance


async def _status(cli: Cli, instance: str, host: str | None, address: str | None) -> int:
    """Show the latest rebuild of INSTANCE: phase, step timings, attempts and last error.

    Exits 0 while it runs and once it completed, 1 when it failed, 4 when it was terminated, cancelled
    or timed out. Example: rebuild status web-1 --host kvm-07
    """
    from common.connection import connect
    from starter.instances_cli import rebuild_host
    from starter.plan_text import plan_lines
    from starter.rebuilds import describe_rebuild
    from workflows.models import Phase

    client = await connect(address)
    described = await describe_rebuild(client, instance, await rebuild_host(cli, client, instance, host))
    if cli.json:
        cli.print_json(described)
        return exit_for_workflow(described.workflow_status)
    cli.say(f"{described.workflow_id}: {described.workflow_status}")
    state = described.status
    if state:
        cli.say(f"  phase: {state.phase.value}")
        if state.summary:
            cli.say(f"  state: {state.summary}")
        if state.outcome is not None:
            down = f", instance down {state.downtime_seconds:.2f} s" if state.downtime_seconds else ""
            cli.say(f"  outcome: {state.outcome.value}{down}")
        if state.phase == Phase.AWAIT_APPROVAL and state.approval_deadline is not None:
            cli.say(f"  waiting for approve until {state.approval_deadline:%Y-%m-%d %H:%M:%S %Z}")
        if state.phase == Phase.CONFIRM_WINDOW and state.confirm_deadline is not None:
            cli.say(f"  waiting for confirm or revert until {state.confirm_deadline:%Y-%m-%d %H:%M:%S %Z}")
        if state.rebuild_id:
            cli.say(f"  rebuild id: {state.rebuild_id} (names the backup next to the disk)")
        cli.say(f"  image: {state.image_url}")
        if state.image_sha256:
            cli.say(f"  image sha256: {state.image_sha256}")
        if state.step_seconds:
            cli.say(f"  steps: {', '.join(f'{k} {v:.2f}s' for k, v in state.step_seconds.items())}")
        cli.say(f"  verify: {state.verified_by or state.verify}")
        if state.disk_mode is not None:
            cli.say(f"  disk mode: {state.disk_mode}")
        if state.stopped_by is not None:
            cli.say(f"  stopped by: {state.stopped_by}")
        if state.plan is not None:
            cli.say("  plan (dry run; a rebuild would):")
            for line in plan_lines(state.plan, "    "):
                cli.say(line)
        if state.last_error:
            cli.say(f"  last error: {state.last_error}")
        for ignored in state.ignored_signals:
            cli.say(f"  {ignored}")
    for p in described.pending_activities:
        last_error = f", last error: {p.last_error}" if p.last_error else ""
        cli.say(f"  running {p.activity}, attempt {p.attempt}{last_error}")
    if described.waiting_for_worker:
        cli.say(f"  {described.waiting_for_worker}")
    return exit_for_workflow(described.workflow_status)


async def _watch(cli: Cli, instance: str, host: str | None, address: str | None) -> int:
    """Follow a rebuild live: each phase as entered, the download's size, speed and ETA, the stop's window.

    Ends when the rebuild ends (with --json: prints its final status as JSON); exit code as for
    `rebuild start --wait`. Example: rebuild watch web-1
    """
    from common.connection import connect
    from starter.instances_cli import rebuild_host
    from starter.rebuilds import latest_rebuild

    client = await connect(address)
    host = await rebuild_host(cli, client, instance, host)
    handle, _ = await latest_rebuild(client, instance, host)
    with cli.following(instance, host, handle.id):
        return await _follow(cli, client, handle, instance, host)


async def _follow(
    cli: Cli, client: Client, handle: WorkflowHandle[Any, Any], instance: str, host: str
) -> int:
    from temporalio.client import WorkflowFailureError

    from starter.follow import Follower, follow, show_last_phases, step_lines
    from starter.rebuilds import describe_rebuild

    if cli.json:
        with contextlib.suppress(WorkflowFailureError):
            await handle.result()
        described = await describe_rebuild(client, instance, host)
        cli.print_json(described)
        return exit_for_rebuild(described.workflow_status, described.result)
    follower = Follower(cli.out)
    with follower.showing():
        running = lambda described: described.workflow_status != "RUNNING"  # noqa: E731
        described = await follow(follower, lambda: describe_rebuild(client, instance, host), running)
        if follower.followed:
            await show_last_phases(follower, handle)
    if described.status and described.status.step_seconds:
        for line in step_lines(described.status.step_seconds, cli.out.width):
            cli.say(line)
    cli.say(f"{described.workflow_id}: {described.workflow_status}")
    if described.status and described.status.last_error:
        cli.say(f"  {described.status.last_error}")
    return exit_for_rebuild(described.workflow_status, described.result)


def abort(
    ctx: typer.Context,
    instance: InstanceArgument,
    reason: Annotated[str, typer.Option(help="Why: recorded in the workflow and shown in the Web UI.")],
    host: FoundHostOption = None,
    requested_by: Annotated[str, typer.Option(help="Who asks.")] = os.environ.get("USER", "unknown"),
    address: AddressOption = None,
    as_json: JsonOption = False,
) -> None:
    """Abort a running rebuild: before stop nothing changes; after stop the old disk is put back.

    Refused once the new disk is in place and verified (cleanup). Exit 0 accepted, 1 refused.

    Example: rebuild abort web-1 --host kvm-07 --reason "wrong image"
    """
    from workflows.models import StrictAbortRequest

    cli = Cli.of(ctx)
    with cli.refusing("abort"):
        request = StrictAbortRequest(reason=reason, requested_by=requested_by)
    cli.run(_abort(cli, instance, host, request, address))


async def _abort(
    cli: Cli, instance: str, host: str | None, request: AbortRequest, address: str | None
) -> int:
    from common.connection import connect
    from starter.instances_cli import rebuild_host
    from starter.rebuilds import abort_rebuild

    client = await connect(address)
    host = await rebuild_host(cli, client, instance, host)
    answer = await abort_rebuild(client, instance, host, request)
    said = f"abort accepted in phase {answer.phase.value}; see: rebuild status {instance} --host {host}"
    return cli.answered(answer, answer.accepted, said, f"abort refused: {answer.message}")


def _decision_command(verdict: str, summary: str) -> Callable[..., None]:
    """approve, confirm and revert: one signal each, the same options."""

    def decide(
        ctx: typer.Context,
        instance: InstanceArgument,
        reason: Annotated[str, typer.Option(help="Why, recorded in the workflow.")] = "",
        host: FoundHostOption = None,
        requested_by: Annotated[str, typer.Option(help="Who decides.")] = os.environ.get("USER", "unknown"),
        address: AddressOption = None,
        as_json: JsonOption = False,
    ) -> None:
        from workflows.models import StrictDecision

        cli = Cli.of(ctx)
        with cli.refusing(verdict):
            decision = StrictDecision(reason=reason, requested_by=requested_by)
        cli.run(_signal(cli, instance, host, verdict, decision, address))

    decide.__doc__ = f"{summary}\n\nExample: rebuild {verdict} web-1 --host kvm-07"
    return decide


async def _signal(
    cli: Cli, instance: str, host: str | None, verdict: str, decision: Decision, address: str | None
) -> int:
    from common.connection import connect
    from starter.instances_cli import rebuild_host
    from starter.rebuilds import send_decision

    client = await connect(address)
    host = await rebuild_host(cli, client, instance, host)
    workflow_id = await send_decision(client, instance, host, verdict, decision)
    if cli.json:
        cli.print_json({"workflow_id": workflow_id, "signal": verdict})
    else:
        cli.say(f"sent {verdict} to {workflow_id}; see: rebuild status {instance} --host {host}")
    return ExitCode.OK


def list_command(
    ctx: typer.Context,
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
    from starter.rebuilds import list_query

    cli = Cli.of(ctx)
    with cli.refusing("filter"):
        query = list_query(phase, host, running)
    cli.run(_list(cli, query, limit, address))


async def _list(cli: Cli, query: str, limit: int, address: str | None) -> int:
    from common.connection import connect
    from starter.rebuilds import list_rebuilds

    rows = await list_rebuilds(await connect(address), query, limit)
    return cli.listing(rows, ("instance", "host", "phase", "status", "started"))
