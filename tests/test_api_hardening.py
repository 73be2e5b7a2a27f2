"""Issue 24, findings 7 and 12 (the API's part), from the side of an API client and of a local user."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from starter.api import _loopback
from starter.api_clients import ApiClients, TokensFileError
from starter.rebuild_api import MAX_ADMIN_PASSWORD_BYTES
from tests.api_support import AUTH


def with_password(host: str, password: str, instance: str = "vm-1") -> dict[str, Any]:
    return {
        "instance": instance,
        "host": host,
        "image_url": "http://images.invalid/b.qcow2",
        "identity": {"admin_password": password},
    }


async def test_a_password_too_long_is_refused_before_any_hashing(
    api: TestClient[Any, Any], unique_host: str
) -> None:
    began = time.monotonic()
    body = with_password(unique_host, "p" * (MAX_ADMIN_PASSWORD_BYTES + 1))
    refused = await api.post("/v1/rebuilds", json=body, headers=AUTH)
    assert refused.status == 400
    assert f"at most {MAX_ADMIN_PASSWORD_BYTES} bytes" in (await refused.json())["error"]
    assert time.monotonic() - began < 0.5


async def test_a_bad_request_is_refused_before_its_password_is_hashed(
    api: TestClient[Any, Any], unique_host: str
) -> None:
    began = time.monotonic()
    body = with_password(unique_host, "p" * MAX_ADMIN_PASSWORD_BYTES, instance="no/such name")
    refused = await api.post("/v1/rebuilds", json=body, headers=AUTH)
    assert refused.status == 400
    assert time.monotonic() - began < 0.5


async def test_healthz_answers_within_a_second_while_a_long_password_is_hashed(
    api: TestClient[Any, Any], unique_host: str
) -> None:
    body = with_password(unique_host, "p" * MAX_ADMIN_PASSWORD_BYTES)
    # The test client shares the API's event loop: each round (a pause, then /healthz) is timed from
    # before the start is sent, so a loop blocked by the hash shows as a slow round.
    began = time.monotonic()
    start = asyncio.create_task(api.post("/v1/rebuilds", json=body, headers=AUTH))
    slowest, rounds = 0.0, 0
    while not start.done():
        await asyncio.sleep(0.1)
        health = await api.get("/healthz")
        assert health.status == 200
        slowest, began, rounds = max(slowest, time.monotonic() - began), time.monotonic(), rounds + 1
    # No worker serves the host: the start is refused after the hash, which blocked nobody.
    assert (await start).status == 400
    assert rounds > 3
    assert slowest < 1.0


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604])
def test_a_tokens_file_others_may_read_is_refused(tmp_path: Path, mode: int) -> None:
    tokens = tmp_path / "api-tokens"
    tokens.write_text("ci a-token-long-enough-1\n")
    tokens.chmod(mode)
    with pytest.raises(TokensFileError, match="readable by others"):
        ApiClients.load(tokens)
    tokens.chmod(0o600)
    assert ApiClients.load(tokens).names() == ["ci"]


def test_plain_http_is_warned_about_off_loopback_only() -> None:
    assert _loopback("127.0.0.1") and _loopback("::1") and _loopback("localhost")
    assert not _loopback("0.0.0.0") and not _loopback("192.0.2.7") and not _loopback("api.example")
