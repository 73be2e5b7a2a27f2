"""The HTTP API's test clients: their tokens, and the header a test sends (``api`` in conftest)."""

from __future__ import annotations

from starter.api_clients import ApiClients

TOKEN = "s3cret-of-the-ci-client"
OTHER_TOKEN = "s3cret-of-the-deploy-bot"
CLIENTS = ApiClients.parse(f"# name token\nci {TOKEN}\ndeploy-bot {OTHER_TOKEN}\n")
AUTH = {"Authorization": f"Bearer {TOKEN}"}
