"""Writing and hashing a download off the event loop, overlapped with reading the next chunk, and
its write-back to disk overlapped with both (``activities/writeback.py``).

Measured on the 2-core dev machine (bench/download.py): doing both inline on the loop reached about a
quarter of curl's speed; two single-thread executors (one writes, one hashes; both release the GIL)
with a few chunks in flight reach about three quarters. Each executor keeps its chunks in order. The
fetch hands chunks over in batches of about a MiB (``BATCH_BYTES``): two executor hand-offs per batch,
not per chunk, take that much work off the event loop's thread, which receiving bounds.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import BinaryIO

from activities.digests import Digests
from activities.writeback import WriteBack

IN_FLIGHT_CHUNKS = 8
# What the fetch gathers before one hand-off to the writer and the hasher.
BATCH_BYTES = 1 << 20


class PipelinedSink:
    def __init__(self, out: BinaryIO, digests: Digests, depth: int = IN_FLIGHT_CHUNKS) -> None:
        self.out = out
        self.digests = digests
        self.depth = depth
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="image-write")
        self._hasher = ThreadPoolExecutor(1, thread_name_prefix="image-hash")
        self._pending: deque[tuple[asyncio.Future[object], asyncio.Future[None]]] = deque()
        out.flush()
        self._writeback = WriteBack(out.fileno(), out.tell())

    async def put(self, chunks: list[bytes]) -> None:
        """A batch of chunks, in order: one hand-off to each thread for all of them."""
        loop = asyncio.get_running_loop()
        self._pending.append(
            (
                loop.run_in_executor(self._writer, self._write, chunks),
                loop.run_in_executor(self._hasher, self._hash, chunks),
            )
        )
        if len(self._pending) > self.depth:
            await self._settle_oldest()

    def _write(self, chunks: list[bytes]) -> None:
        """In the writer thread: the chunks to the kernel, and their write-back started as due."""
        out = self.out
        for chunk in chunks:
            out.write(chunk)
        out.flush()
        self._writeback.advance(sum(map(len, chunks)))

    def _hash(self, chunks: list[bytes]) -> None:
        for chunk in chunks:
            self.digests.update(chunk)

    async def drain(self) -> None:
        """Every chunk put so far is written (to the page cache) and hashed."""
        while self._pending:
            await self._settle_oldest()

    async def close(self) -> None:
        """Wait for what is in flight, whatever happened, so nothing writes after the file closes."""
        for write, digest in self._pending:
            with contextlib.suppress(Exception):
                await write
            with contextlib.suppress(Exception):
                await digest
        self._pending.clear()
        self._writer.shutdown()
        self._hasher.shutdown()

    async def _settle_oldest(self) -> None:
        write, digest = self._pending.popleft()
        await write
        await digest
