"""The digests of an image, computed while its bytes stream past, and checked against the request.

SHA-256 is always computed: it names the image in the cache. SHA-512 is computed too when the request
(or the Glance record) gives one.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from activities.errors import ChecksumMismatch

CHUNK_BYTES = 1 << 20


class Digests:
    def __init__(self, want_sha512: bool) -> None:
        self.sha256 = hashlib.sha256()
        self.sha512 = hashlib.sha512() if want_sha512 else None

    def update(self, chunk: bytes) -> None:
        self.sha256.update(chunk)
        if self.sha512 is not None:
            self.sha512.update(chunk)

    def hash_file_prefix(self, path: Path, length: int) -> None:
        """Take in the first ``length`` bytes of a partial download before resuming it."""
        if not length:
            return
        with open(path, "rb") as existing:
            remaining = length
            while remaining and (block := existing.read(min(CHUNK_BYTES, remaining))):
                self.update(block)
                remaining -= len(block)

    def verify(self, source: str, sha256: str | None, sha512: str | None) -> str:
        """The SHA-256 hex digest, once every digest the request named matched."""
        got256 = self.sha256.hexdigest()
        if sha256 and got256 != sha256:
            raise ChecksumMismatch(f"image at {source} has SHA-256 {got256}, expected {sha256}")
        if sha512:
            got512 = self.sha512.hexdigest() if self.sha512 is not None else None
            if got512 != sha512:
                raise ChecksumMismatch(f"image at {source} has SHA-512 {got512}, expected {sha512}")
        return got256
