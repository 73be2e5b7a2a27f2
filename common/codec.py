"""Payload encryption: rebuild inputs may hold secrets (user data), so Temporal stores only ciphertext.

AES-256-GCM over each serialised payload, as Temporal's encryption samples do. The key lives in a file
on the machines that start rebuilds and run them (``REBUILD_CODEC_KEY_FILE``); the Temporal server, its
database and the Web UI see only ``binary/encrypted`` payloads, unless the UI is pointed at the codec
server below, which decodes for those who can reach it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

from temporalio.api.common.v1 import Payload
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.converter import DataConverter, DefaultFailureConverterWithEncodedAttributes, PayloadCodec

ENCODING = b"binary/encrypted"
# The one plaintext encoding a codec with a key lets through: a null carries nothing to forge or leak.
PLAIN_ALLOWED = frozenset({b"binary/null"})
KEY_ENV = "REBUILD_CODEC_KEY_FILE"
CREDENTIAL = "codec-key"
NONCE_BYTES = 12


class CodecKeyError(ValueError):
    """The key file is missing, unreadable or not a 256-bit key."""


def load_key(path: Path) -> bytes:
    """A key file holds 64 hexadecimal digits (``openssl rand -hex 32``)."""
    try:
        text = path.read_text().strip()
    except OSError as err:
        raise CodecKeyError(f"cannot read codec key file {path}: {err.strerror}") from None
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) != 32:
        raise CodecKeyError(f"codec key file {path} must hold 64 hexadecimal digits (a 256-bit key)")
    return key


class PlaintextRefused(CodecKeyError):
    """A payload arrived unencrypted where a key is configured: from a client without the key."""


class EncryptionCodec(PayloadCodec):
    """Encrypts every payload; refuses to decode one that is not encrypted with this key.

    Accepting plaintext would let any client that reaches Temporal without the key (``temporal workflow
    signal``, an activity scheduled by name on a host's queue) hand the worker inputs it never sealed.
    """

    def __init__(self, key: bytes) -> None:
        # Loaded here: a client without a key (most `rebuild` commands) never pays for cryptography.
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        self.key_id = hashlib.sha256(key).hexdigest()[:16].encode()
        self.cipher = AESGCM(key)

    async def encode(self, payloads: Sequence[Payload]) -> list[Payload]:
        return [
            Payload(
                metadata={"encoding": ENCODING, "encryption-key-id": self.key_id},
                data=self._encrypt(payload.SerializeToString()),
            )
            for payload in payloads
        ]

    async def decode(self, payloads: Sequence[Payload]) -> list[Payload]:
        decoded = []
        for payload in payloads:
            encoding = payload.metadata.get("encoding", b"")
            if encoding in PLAIN_ALLOWED:
                decoded.append(payload)
                continue
            if encoding != ENCODING:
                raise PlaintextRefused(
                    f"refused a plaintext payload ({encoding.decode(errors='replace')[:40]}): "
                    "this process has a codec key, so everything it reads must be encrypted with it"
                )
            if payload.metadata.get("encryption-key-id") != self.key_id:
                raise CodecKeyError("payload was encrypted with another key than this codec's")
            decoded.append(Payload.FromString(self._decrypt(payload.data)))
        return decoded

    def _encrypt(self, data: bytes) -> bytes:
        nonce = os.urandom(NONCE_BYTES)
        return nonce + self.cipher.encrypt(nonce, data, None)

    def _decrypt(self, data: bytes) -> bytes:
        return self.cipher.decrypt(data[:NONCE_BYTES], data[NONCE_BYTES:], None)


def _credential() -> Path | None:
    """The key systemd passed with ``LoadCredential=codec-key:...``: a unit's dynamic user cannot read
    the root-only file, but gets its copy in ``$CREDENTIALS_DIRECTORY``."""
    directory = os.environ.get("CREDENTIALS_DIRECTORY")
    path = Path(directory, CREDENTIAL) if directory else None
    return path if path is not None and path.exists() else None


def data_converter(key_file: Path | None = None) -> DataConverter:
    """The pydantic converter, encrypting when a key is configured (argument, environment, or the
    systemd credential ``codec-key``).

    With a key, failures are encrypted too: their message and stack trace (host paths, console lines)
    move into the encoded attributes, and the history shows only "Encoded failure"."""
    path = key_file or (Path(os.environ[KEY_ENV]) if os.environ.get(KEY_ENV) else None) or _credential()
    if path is None:
        return pydantic_data_converter
    return dataclasses.replace(
        pydantic_data_converter,
        payload_codec=EncryptionCodec(load_key(path)),
        failure_converter_class=DefaultFailureConverterWithEncodedAttributes,
    )
