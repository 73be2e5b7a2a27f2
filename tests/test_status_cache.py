"""Pollers of one rebuild share one trip to Temporal; answers are never older than the TTL."""

from __future__ import annotations

import asyncio

import pytest

from starter.status_cache import StatusCache


class Source:
    def __init__(self) -> None:
        self.calls = 0
        self.fail = False

    async def fetch(self, host: str, instance: str) -> str:
        self.calls += 1
        await asyncio.sleep(0.05)
        if self.fail:
            raise LookupError(f"{host}/{instance}")
        return f"{host}/{instance}#{self.calls}"


async def test_concurrent_pollers_share_one_fetch() -> None:
    source = Source()
    cache = StatusCache(source.fetch, ttl=10)
    answers = await asyncio.gather(*(cache.get("kvm-1", "vm-1") for _ in range(50)))
    assert set(answers) == {"kvm-1/vm-1#1"}
    assert source.calls == 1
    assert await cache.get("kvm-1", "vm-2") == "kvm-1/vm-2#2"


async def test_an_answer_expires_after_the_ttl_and_forget_drops_it_at_once() -> None:
    source = Source()
    # 2 s, not less: a loaded CI machine once took over 0.2 s between two awaits.
    cache = StatusCache(source.fetch, ttl=2.0, grace=0)
    assert await cache.get("h", "i") == "h/i#1"
    assert await cache.get("h", "i") == "h/i#1"
    await asyncio.sleep(2.1)
    assert await cache.get("h", "i") == "h/i#2"
    cache.forget("h", "i")
    assert await cache.get("h", "i") == "h/i#3"


async def test_pollers_get_the_previous_answer_while_it_is_refreshed() -> None:
    source = Source()
    cache = StatusCache(source.fetch, ttl=0.3, grace=1.0)
    assert await cache.get("h", "i") == "h/i#1"
    await asyncio.sleep(0.35)
    # Stale but within the grace: answered at once, and a refresh started behind it.
    assert await asyncio.wait_for(cache.get("h", "i"), 0.01) == "h/i#1"
    await asyncio.sleep(0.1)
    assert await cache.get("h", "i") == "h/i#2"
    await asyncio.sleep(1.4)
    # Past the grace: the caller waits for a fresh answer.
    assert await cache.get("h", "i") == "h/i#3"


async def test_failures_are_shared_but_never_kept() -> None:
    source = Source()
    source.fail = True
    cache = StatusCache(source.fetch, ttl=10)
    results = await asyncio.gather(*(cache.get("h", "i") for _ in range(5)), return_exceptions=True)
    assert all(isinstance(r, LookupError) for r in results)
    assert source.calls == 1
    source.fail = False
    assert await cache.get("h", "i") == "h/i#2"


async def test_a_caller_that_hangs_up_does_not_cancel_the_others() -> None:
    source = Source()
    cache = StatusCache(source.fetch, ttl=10)
    impatient = asyncio.ensure_future(cache.get("h", "i"))
    patient = asyncio.ensure_future(cache.get("h", "i"))
    await asyncio.sleep(0.01)
    impatient.cancel()
    assert await patient == "h/i#1"
    with pytest.raises(asyncio.CancelledError):
        await impatient
