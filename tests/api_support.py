"""The HTTP API's test clients: their tokens, and the header a test sends (``api`` in conftest)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from aiohttp.test_utils import TestClient, TestServer
from temporalio.client import Client

from starter.api import create_app
from starter.api_clients import ApiClients

TOKEN = "s3cret-of-the-ci-client"
OTHER_TOKEN = "s3cret-of-the-deploy-bot"
CLIENTS = ApiClients.parse(f"# name token\nci {TOKEN}\ndeploy-bot {OTHER_TOKEN}\n")
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@asynccontextmanager
async def serve_api(client: Client, clients: ApiClients = CLIENTS) -> AsyncIterator[TestClient[Any, Any]]:
    """The HTTP API in process, on the dev server, for these API clients."""
    test_client = TestClient(TestServer(create_app(client, clients)))
    await test_client.start_server()
    try:
        yield test_client
    finally:
        await test_client.close()
