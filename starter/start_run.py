"""``rebuild start``'s run: start the workflow, then follow it or wait past inspect, and say how it ended.

Apart from ``starter/cli.py``, which declares the command, so that building the CLI (every ``--help``)
loads neither temporalio nor the models: they load here, when a rebuild is started.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from temporalio.client import Client, WorkflowFailureError, WorkflowHandle
from temporalio.exceptions import ApplicationError, CancelledError, TerminatedError, TimeoutError

from common.connection import connect
from common.exit_codes import ExitCode
from starter.cli_context import Cli, exit_for_rebuild
from starter.follow import Follower, follow, show_last_phases, step_lines
from starter.instances_cli import found_host
from starter.plan_text import print_plan
from starter.rebuilds import describe_rebuild, start_rebuild, wait_past_inspect, with_measured_downtime
from workflows.models import RebuildRequest, RebuildResult
from workflows.results import failure_result


async def run_start(
    cli: Cli, request: RebuildRequest, wait: bool, address: str | None, find_host: bool
) -> int:
    client = await connect(address)
    if find_host:
        request = request.model_copy(update={"host": await found_host(cli, client, request.instance)})
    handle = await start_rebuild(client, request)
    if request.dry_run:
        with cli.following(request.instance, request.host, handle.id):
            return await _planned(cli, client, handle, request)
    if wait:
        with cli.following(request.instance, request.host, handle.id):
            return await _wait(cli, client, handle, request)
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


async def _wait(
    cli: Cli, client: Client, handle: WorkflowHandle[Any, RebuildResult], request: RebuildRequest
) -> int:
    """Each phase on stderr as it is entered, the download's and the stop's progress, then the result."""
    if not cli.json:
        await _follow_to_its_end(cli, client, handle, request)
    return await _ended(cli, handle)


async def _follow_to_its_end(
    cli: Cli, client: Client, handle: WorkflowHandle[Any, RebuildResult], request: RebuildRequest
) -> None:
    """Each phase on stderr as it is entered, and the download's and the stop's progress, until the
    workflow has ended (how it ended is the caller's to say)."""
    follower = Follower(cli.err)
    with follower.showing():
        describe = lambda: describe_rebuild(client, request.instance, request.host)  # noqa: E731
        watcher = asyncio.create_task(follow(follower, describe, ended=lambda _: False))
        try:
            with contextlib.suppress(WorkflowFailureError):
                await handle.result()
        finally:
            watcher.cancel()
        await show_last_phases(follower, handle)


async def _planned(
    cli: Cli, client: Client, handle: WorkflowHandle[Any, RebuildResult], request: RebuildRequest
) -> int:
    """A dry run: its phases, then its plan with this host's measured downtime; a refusal as a rebuild's."""
    if not cli.json:
        await _follow_to_its_end(cli, client, handle, request)
    try:
        planned = await handle.result()
    except WorkflowFailureError:
        return await _ended(cli, handle)
    assert planned.plan is not None
    plan = await with_measured_downtime(client, planned.plan)
    if cli.json:
        cli.print_json(plan)
    else:
        print_plan(cli, planned.model_copy(update={"plan": plan}))
    return ExitCode.OK


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


def _print_result(cli: Cli, result: RebuildResult) -> None:
    # The digest on a line of its own: with it, the first line would not fit 80 columns.
    cli.say(f"rebuilt {result.instance} on {result.host}")
    cli.say(f"  image sha256 {result.image_sha256}")
    for line in step_lines(result.step_seconds, cli.out.width):
        cli.say(line)
    if result.downtime_seconds is not None:
        forced = " (forced off after the graceful timeout)" if result.forced_stop else ""
        cli.say(f"  downtime: {result.downtime_seconds:.2f}s{forced}")
    if result.stopped_by is not None:
        cli.say(f"  stopped by: {result.stopped_by}")
    if result.verified_by is not None:
        cli.say(f"  verified by: {result.verified_by}")
    if result.disk_mode is not None:
        cli.say(f"  disk mode: {result.disk_mode}")
