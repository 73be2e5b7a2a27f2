"""Many callers polling one rebuild's status share one trip to Temporal.

A dashboard or a fleet of services may poll the same rebuild dozens of times a second; each answer
costs Temporal a describe and a query (which a worker answers). Concurrent requests for one rebuild
wait for the same fetch (single flight), and an answer is reused for ``ttl`` seconds, so the
load Temporal sees is at most one fetch per rebuild per ``ttl``, whatever the request rate. Once it
is older, the next caller starts a new fetch and, while the answer is younger than ``ttl + grace``,
gets the previous one at once (stale while revalidating): pollers never queue behind a refresh.
A start, signal or abort through the same API forgets the rebuild's answer at once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")
Key = tuple[str, str]
MAX_ENTRIES = 10_000


@dataclass(frozen=True)
class _Entry(Generic[T]):
    value: T
    at: float


class StatusCache(Generic[T]):
    def __init__(
        self, fetch: Callable[[str, str], Awaitable[T]], ttl: float = 1.0, grace: float = 1.0
    ) -> None:
        self._fetch = fetch
        self._ttl = ttl
        self._grace = grace
        self._entries: dict[Key, _Entry[T]] = {}
        self._inflight: dict[Key, asyncio.Future[T]] = {}
        self.fetches = 0

    async def get(self, host: str, instance: str) -> T:
        key = (host, instance)
        entry = self._entries.get(key)
        age = time.monotonic() - entry.at if entry is not None else None
        if entry is not None and age is not None and age < self._ttl:
            return entry.value
        pending = self._inflight.get(key)
        if pending is None:
            pending = asyncio.ensure_future(self._fetch_and_keep(key))
            self._inflight[key] = pending
            pending.add_done_callback(self._settled(key))
        if entry is not None and age is not None and age < self._ttl + self._grace:
            return entry.value
        # Shielded: one caller that hangs up does not cancel the fetch the others wait for.
        return await asyncio.shield(pending)

    def _settled(self, key: Key) -> Callable[[asyncio.Future[T]], None]:
        def forget_fetch(done: asyncio.Future[T]) -> None:
            self._inflight.pop(key, None)
            if not done.cancelled():
                done.exception()  # retrieved: a failed background refresh is not an unhandled error

        return forget_fetch

    def forget(self, host: str, instance: str) -> None:
        self._entries.pop((host, instance), None)
        # A fetch already under way may predate the change: its answer must not be kept either.
        self._inflight.pop((host, instance), None)

    async def _fetch_and_keep(self, key: Key) -> T:
        self.fetches += 1
        began = time.monotonic()
        value = await self._fetch(*key)
        if len(self._entries) >= MAX_ENTRIES:
            self._entries.clear()
        # Dated from the start of the fetch: an answer is never older than ttl when served.
        self._entries[key] = _Entry(value, began)
        return value
