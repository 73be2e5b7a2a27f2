"""The Temporal floor for the fleet bench: a parent that runs N no-op children, K at a time.

Whatever the fleet costs beyond this (rebuild steps, limits, bookkeeping) is ours; this much any
parent with that many children pays.
"""

from __future__ import annotations

import asyncio

from temporalio import workflow


@workflow.defn
class FloorChild:
    @workflow.run
    async def run(self, number: int) -> int:
        return number


@workflow.defn
class FloorParent:
    @workflow.run
    async def run(self, spec: list[int]) -> int:
        count, at_once = spec
        slots = asyncio.Semaphore(at_once)
        prefix = workflow.info().workflow_id

        async def one(number: int) -> int:
            async with slots:
                result: int = await workflow.execute_child_workflow(
                    FloorChild.run, number, id=f"{prefix}-{number}"
                )
                return result

        done = await asyncio.gather(*(one(n) for n in range(count)))
        return len(done)
