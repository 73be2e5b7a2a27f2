"""Real components for the tests: the Temporal dev server and, for end-to-end tests, libvirtd.

A component that cannot be started fails the tests that need it, with a message naming it; nothing
is skipped.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import libvirt
import pytest
from aiohttp.test_utils import TestClient
from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.worker import Worker

from devtools import reachable
from devtools.image_server import ImageServer
from devtools.temporal_dev import DevServer, DevServerError, free_port
from devtools.testbed.ceph import CephCluster, CephError, define_secret, start_cluster
from devtools.testbed.e2e import LIBVIRT_URI, Guest, WorkerProcess, make_guest, remove_domains
from devtools.testbed.fake_host import FakeHost
from devtools.testbed.shapes import Bed
from tests.api_support import CLIENTS, serve_api
from workflows.models import WORKFLOW_TASK_QUEUE, host_task_queue
from workflows.rebuild import RebuildInstance
from workflows.snapshot import SNAPSHOT_WORKFLOWS


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


@pytest.fixture(scope="session")
def libvirt_conn() -> Iterator[Any]:
    if shutil.which("qemu-system-x86_64") is None:
        pytest.fail(
            "QEMU is missing: qemu-system-x86_64 is not on PATH (run scripts/setup-host.sh)", pytrace=False
        )
    try:
        conn = libvirt.open(LIBVIRT_URI)
    except libvirt.libvirtError as err:
        pytest.fail(
            f"libvirtd is not reachable at {LIBVIRT_URI}: {err.get_error_message()} "
            "(run scripts/setup-host.sh)",
            pytrace=False,
        )
    yield conn
    # Whatever a failed or interrupted test left defined goes too: the host is left as found.
    leaked = remove_domains(conn)
    conn.close()
    if leaked:
        print(f"\nremoved domains that tests left behind: {', '.join(leaked)}")


@pytest.fixture(scope="session")
def reachable_root() -> Iterator[Path]:
    """This run's directory for guest disks and host caches, traversable by QEMU's own user.

    QEMU runs as the distribution's unprivileged user here, as on an operator's host: a disk inside
    pytest's 0700 temporary directories would not open, and a test that passed only because QEMU ran
    as root would hide exactly that.
    """
    root = reachable.make_dir("run-")
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def reachable_tmp(reachable_root: Path) -> Path:
    """A test's own directory that QEMU's user can reach (unlike ``tmp_path``)."""
    return reachable.make_dir("test-", reachable_root)


@pytest.fixture
def guest_dir(reachable_tmp: Path) -> Path:
    directory = reachable_tmp / "guests"
    directory.mkdir()
    return directory


@pytest.fixture
def guests(libvirt_conn: Any) -> Iterator[list[Guest]]:
    made: list[Guest] = []
    yield made
    for guest in made:
        guest.remove()


@pytest.fixture
def guest(libvirt_conn: Any, guest_dir: Path, guests: list[Guest]) -> Guest:
    """A running real guest whose boot sector prints "image A", removed after the test."""
    made = make_guest(libvirt_conn, guest_dir)
    guests.append(made)
    return made


@pytest.fixture
def worker(
    dev_server: DevServer, unique_host: str, tmp_path: Path, reachable_tmp: Path
) -> Iterator[WorkerProcess]:
    pause_dir = tmp_path / "pause"
    pause_dir.mkdir()
    process = WorkerProcess(
        host=unique_host,
        state_dir=reachable_tmp / "host-state",
        address=dev_server.address,
        log=tmp_path / "worker.log",
        pause_dir=pause_dir,
    )
    process.start()
    yield process
    process.stop()


@pytest.fixture
async def images(tmp_path: Path) -> AsyncIterator[ImageServer]:
    directory = tmp_path / "served"
    directory.mkdir()
    server = ImageServer(directory)
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def fake_host(client: Client, unique_host: str) -> AsyncIterator[FakeHost]:
    """A fake host behind the shared workflow queue, as `rebuild start` uses it."""
    fake = FakeHost()
    async with (
        Worker(
            client,
            task_queue=WORKFLOW_TASK_QUEUE,
            workflows=[RebuildInstance, *SNAPSHOT_WORKFLOWS],
        ),
        Worker(client, task_queue=host_task_queue(unique_host), activities=fake.activities()),
    ):
        yield fake


@pytest.fixture
async def api(client: Client) -> AsyncIterator[TestClient[Any, Any]]:
    """The HTTP API in process, on the dev server; its clients are ``tests.api_support``'s."""
    async with serve_api(client, CLIENTS) as test_client:
        yield test_client


@pytest.fixture(scope="session")
def ceph(libvirt_conn: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CephCluster]:
    """A throwaway single-node Ceph cluster (devtools/testbed/ceph.py) with its client key in a libvirt
    secret, both gone after the session."""
    try:
        cluster = start_cluster(tmp_path_factory.mktemp("ceph"))
    except CephError as err:
        pytest.fail(f"a test Ceph cluster could not be started: {err}", pytrace=False)
    secret = define_secret(libvirt_conn, cluster)
    print(f"\nceph: test cluster started in {cluster.started_in:.1f} s on port {cluster.port}")
    yield cluster
    secret.undefine()
    cluster.stop()


# Fixtures that put a test on libvirtd with QEMU guests, or on the real Debian guest.
GUEST_FIXTURES = frozenset({"libvirt_conn", "worker", "guest", "guests"})
REAL_GUEST_FIXTURES = frozenset({"real_guest", "real_worker", "real_images"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark each test by what it runs on, from the fixtures it asks for (``make unit`` leaves both out)."""
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        if fixtures & REAL_GUEST_FIXTURES or "real_guest" in item.path.parts:
            item.add_marker(pytest.mark.real_guest)
        if fixtures & (GUEST_FIXTURES | REAL_GUEST_FIXTURES):
            item.add_marker(pytest.mark.guest)


@pytest.fixture
def bed(
    libvirt_conn: Any, guest_dir: Path, worker: WorkerProcess, images: ImageServer, dev_server: DevServer
) -> Iterator[Bed]:
    """Hand-shaped guests on libvirtd, a worker and an image server (devtools/testbed/shapes.py)."""
    made = Bed(libvirt_conn, guest_dir, worker, images, dev_server)
    yield made
    made.remove_guests()
