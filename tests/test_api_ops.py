"""The API as operators run it: a Temporal outage, TLS, and the tokens file it starts from."""

from __future__ import annotations

import asyncio
import ssl
import subprocess
import time
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter

from devtools.temporal_dev import DevServer, free_port
from starter.api import create_app, tls_context
from starter.api_clients import ApiClients, TokensFileError
from starter.http_kit import REQUEST_TIMEOUT

TOKEN = "a-token-long-enough-1"
CLIENTS = ApiClients.parse(f"ops {TOKEN}")
AUTH = {"Authorization": f"Bearer {TOKEN}"}


async def serve(app: web.Application, context: ssl.SSLContext | None = None) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port, ssl_context=context).start()
    return runner, port


async def test_a_temporal_outage_is_503_in_json_not_a_500(tmp_path: Path) -> None:
    server = DevServer(tmp_path / "t.db", free_port(), free_port(), tmp_path / "t.log")
    server.start()
    try:
        client = await Client.connect(server.address, data_converter=pydantic_data_converter)
        runner, port = await serve(create_app(client, CLIENTS))
    finally:
        server.stop()
    try:
        async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as http:
            began = time.monotonic()
            async with http.get("/v1/rebuilds/kvm-1/vm-1", headers=AUTH) as shown:
                assert shown.status == 503
                body = await shown.json()
            assert body["status"] == 503
            assert body["error"].startswith("Temporal is unavailable")
            assert time.monotonic() - began < REQUEST_TIMEOUT + 1
            async with http.get("/v1/rebuilds", headers=AUTH) as listed:
                assert listed.status == 503
            async with http.get("/healthz") as health:
                assert health.status == 503
                assert (await health.json())["error"].startswith("Temporal is unavailable")
    finally:
        await runner.cleanup()


def make_certificate(directory: Path) -> tuple[Path, Path]:
    cert, key = directory / "api.crt", directory / "api.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


async def test_tls_serves_https_and_the_health_check(client: Client, tmp_path: Path) -> None:
    cert, key = make_certificate(tmp_path)
    runner, port = await serve(create_app(client, CLIENTS), tls_context(cert, key))
    trusting = ssl.create_default_context(cafile=str(cert))
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(f"https://127.0.0.1:{port}/healthz", ssl=trusting) as health:
                assert health.status == 200
            async with http.get(f"https://127.0.0.1:{port}/v1/rebuilds", ssl=trusting, headers=AUTH) as rows:
                assert rows.status == 200
            with pytest.raises(aiohttp.ClientConnectorCertificateError):
                await http.get(f"https://127.0.0.1:{port}/healthz")
    finally:
        await runner.cleanup()


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "at least one client token"),
        ("just-a-token-with-no-name", "expected 'NAME TOKEN'"),
        ("ci short", "shorter than 16"),
        ("ci a-token-long-enough-1\nci another-token-long-enough", "appears twice"),
        ("a/b a-token-long-enough-1", "not a usable client name"),
    ],
)
def test_unusable_tokens_files_are_refused_with_the_line(text: str, fragment: str) -> None:
    with pytest.raises(TokensFileError, match=fragment):
        ApiClients.parse(text)


def test_each_token_names_its_own_client() -> None:
    clients = ApiClients.parse("ci a-token-long-enough-1\nbot b-token-long-enough-2\n")
    assert clients.identify("Bearer a-token-long-enough-1").name == "ci"  # type: ignore[union-attr]
    assert clients.identify("Bearer b-token-long-enough-2").name == "bot"  # type: ignore[union-attr]
    assert clients.identify("Bearer a-token-long-enough") is None
    assert clients.identify("a-token-long-enough-1") is None


def test_the_api_refuses_to_start_without_a_readable_tokens_file(tmp_path: Path) -> None:
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "starter.api", "--tokens-file", str(tmp_path / "missing")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2
    assert "cannot read the tokens file" in done.stderr


async def test_the_token_comparison_takes_no_shortcut() -> None:
    # Not a timing test: a wrong token of the right length and one of another length both fail.
    await asyncio.sleep(0)
    assert CLIENTS.identify("Bearer " + "x" * len(TOKEN)) is None
