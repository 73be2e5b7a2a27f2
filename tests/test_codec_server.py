"""Issue 24, finding 8, from the side of anyone who reaches the codec server without a token."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from google.protobuf import json_format
from temporalio.api.common.v1 import Payload, Payloads

from common.codec import EncryptionCodec
from starter.api_clients import ApiClients
from starter.codec_server import build_app

UI = "http://localhost:8233"
TOKEN = "codec-token-0123456789"
SECRET = b'"db_password=very-secret-4711"'


@pytest.fixture
async def codec_http() -> AsyncIterator[tuple[TestClient[Any, Any], str]]:
    codec = EncryptionCodec(os.urandom(32))
    sealed = Payloads(
        payloads=await codec.encode([Payload(metadata={"encoding": b"json/plain"}, data=SECRET)])
    )
    server = TestServer(build_app(codec, UI, ApiClients.parse(f"ui {TOKEN}")))
    async with TestClient(server) as http:
        yield http, json_format.MessageToJson(sealed)


@pytest.mark.parametrize("authorization", [None, "Bearer wrong-token-0123456789", TOKEN])
async def test_decode_without_the_token_is_401_and_reveals_nothing(
    codec_http: tuple[TestClient[Any, Any], str], authorization: str | None
) -> None:
    http, sealed = codec_http
    headers = {"Origin": UI, "Content-Type": "application/json"}
    if authorization:
        headers["Authorization"] = authorization
    answer = await http.post("/decode", data=sealed, headers=headers)
    assert answer.status == 401
    assert b"very-secret" not in await answer.read()
    assert answer.headers["Vary"] == "Origin"


async def test_decode_with_the_token_answers_with_cors_for_the_web_ui(
    codec_http: tuple[TestClient[Any, Any], str],
) -> None:
    http, sealed = codec_http
    headers = {"Origin": UI, "Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"}
    answer = await http.post("/decode", data=sealed, headers=headers)
    assert answer.status == 200
    assert json_format.Parse(await answer.text(), Payloads()).payloads[0].data == SECRET
    assert answer.headers["Access-Control-Allow-Origin"] == UI
    assert answer.headers["Vary"] == "Origin"


async def test_a_preflight_from_the_web_ui_allows_the_token_header_and_others_are_refused(
    codec_http: tuple[TestClient[Any, Any], str],
) -> None:
    http, _ = codec_http
    asked = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}
    ok = await http.options("/decode", headers={"Origin": UI, **asked})
    assert ok.status == 204
    assert ok.headers["Access-Control-Allow-Origin"] == UI
    assert "POST" in ok.headers["Access-Control-Allow-Methods"]
    assert "authorization" in ok.headers["Access-Control-Allow-Headers"]
    assert ok.headers["Vary"] == "Origin"
    evil = await http.options("/decode", headers={"Origin": "https://evil.example", **asked})
    assert evil.status == 403
    assert "Access-Control-Allow-Origin" not in evil.headers
    assert evil.headers["Vary"] == "Origin"
