"""Rebuild one instance from a Python service, without the CLI or the HTTP API.

The same calls the `rebuild` CLI and `rebuild-api` make (``starter/rebuilds.py``): connect, start
(answered once the rebuild is past inspect), follow its phase, approve it when it waits for
approval, and read its end. Run it from the repository's root, where Temporal is reachable
(``TEMPORAL_ADDRESS``, a profile, or ``--address``), with the codec key in ``REBUILD_CODEC_KEY_FILE``
when the workers use one:

    .venv/bin/python -m docs.examples.rebuild_from_service web-1 --host kvm-07 \\
        --image https://images.example/noble.qcow2 --sha256 HEX

Exit status, as the CLI's: 0 rebuilt, 1 failed (rolled back or unchanged), 2 refused, 3 Temporal
unreachable, 4 ended without a result (terminated, cancelled, timed out).
See docs/python-api.md.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from pydantic import ValidationError
from temporalio.client import WorkflowFailureError

from common.connection import TemporalUnavailable, connect
from starter.errors import ServiceError
from starter.rebuilds import describe_rebuild, send_decision, start_past_inspect
from workflows.models import Decision, Outcome, Phase, StrictRebuildRequest
from workflows.results import failure_result

SERVICE = "example-service"  # who asks: shown in status, the Web UI and the approval record


async def rebuild(args: argparse.Namespace) -> int:
    try:
        request = StrictRebuildRequest(
            instance=args.instance,
            host=args.host,
            image_url=args.image,
            sha256=args.sha256,
            require_approval=args.approve,
            requested_by=SERVICE,
        )
    except ValidationError as invalid:
        print(f"refused: {invalid}", file=sys.stderr)
        return 2
    try:
        client = await connect(args.address)
        # Refused at once (ServiceError): no worker on that host, a rebuild already running, or
        # inspect's verdict (unknown instance, unsupported root disk: RefusedAtInspect).
        handle, phase = await start_past_inspect(client, request)
    except TemporalUnavailable as unreachable:
        print(unreachable, file=sys.stderr)
        return 3
    except ServiceError as refused:
        print(f"refused: {refused}", file=sys.stderr)
        return 2
    print(f"started {handle.id}: phase {phase.value if phase else 'ended'}")

    approved = False
    while True:
        described = await describe_rebuild(client, request.instance, request.host)
        if described.workflow_status != "RUNNING":
            break
        status = described.status
        if status is not None:
            print(f"  phase: {status.phase.value}")
            if status.phase == Phase.AWAIT_APPROVAL and not approved:
                # One of "approve", "confirm", "revert"; the workflow records one that means nothing now.
                await send_decision(
                    client,
                    request.instance,
                    request.host,
                    "approve",
                    Decision(reason="checked", requested_by=SERVICE),
                )
                approved = True
        if described.waiting_for_worker:
            print(f"  {described.waiting_for_worker}")
        await asyncio.sleep(2)

    try:
        result = await handle.result()
    except WorkflowFailureError as failure:
        ended = failure_result(failure.cause)
        if ended is None:  # terminated, cancelled or timed out: look at the instance first
            print(f"ended without a result: {failure.cause}", file=sys.stderr)
            return 4
        print(f"{ended.outcome.value} at {ended.failed_step}: {ended.error}", file=sys.stderr)
        return 1
    print(f"{result.outcome.value}: {result.image_url} (sha256 {result.image_sha256})")
    print(f"down for {result.downtime_seconds} s; steps: {result.step_seconds}")
    return 0 if result.outcome == Outcome.REBUILT else 1


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("instance")
    parser.add_argument("--host", required=True, help="the instance's hypervisor")
    parser.add_argument("--image", help="image URL; none: the instance's current image")
    parser.add_argument("--sha256", help="the image's expected SHA-256")
    parser.add_argument("--approve", action="store_true", help="ask for approval, then give it")
    parser.add_argument(
        "--address", help="Temporal's HOST:PORT (default: TEMPORAL_ADDRESS, then localhost:7233)"
    )
    sys.exit(asyncio.run(rebuild(parser.parse_args())))


if __name__ == "__main__":
    main()
