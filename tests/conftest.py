"""Real components for the tests: the Temporal dev server and, for end-to-end tests, libvirtd.

A component that cannot be started fails the tests that need it, with a message naming it; nothing
is skipped.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter

from devtools.temporal_dev import DevServer, DevServerError, free_port


@pytest.fixture(scope="session")
def dev_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevServer]:
    state = tmp_path_factory.mktemp("temporal")
    server = DevServer(
        db_file=state / "temporal.db",
        port=free_port(),
        ui_port=free_port(),
        log_file=state / "temporal.log",
    )
    try:
        server.start()
    except DevServerError as err:
        pytest.fail(f"Temporal dev server could not be started: {err}", pytrace=False)
    yield server
    server.stop()


@pytest.fixture(scope="session")
async def client(dev_server: DevServer) -> AsyncIterator[Client]:
    yield await Client.connect(dev_server.address, data_converter=pydantic_data_converter)


@pytest.fixture
def unique_host() -> str:
    """A host name no other test uses, so each test has its own host task queue."""
    return f"test-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    path = tmp_path / "state"
    path.mkdir()
    return path
