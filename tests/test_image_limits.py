"""Issue 24, finding 13: disk use is the worker's to bound, not the caller's.

``fetch_image``'s ``max_bytes`` comes from whoever schedules it, and was only checked to be positive;
the cache had no quota: any Temporal client could fill the file system the instances' disks live on.
The worker now caps every image (``--max-image-gib``) and the whole cache (``--cache-quota-gib``),
before the download, with non-retryable errors that say which limit refused it.
"""

from __future__ import annotations

import random
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from temporalio.client import Client
from temporalio.worker import Worker

from activities.image_fetch import cache_usage
from activities.state import StateDir
from devtools.image_server import Fault, ImageServer
from devtools.testbed.e2e import LOOPBACK_NETWORKS
from devtools.testbed.libvirt_test_driver import make_instance
from tests.test_hostile_inputs import AttackCall, Attacker
from worker import WorkerConfig, host_activities
from workflows.models import host_task_queue

MIB = 1 << 20


@pytest.fixture
async def attack(client: Client, unique_host: str, tmp_path: Path) -> AsyncIterator[Any]:
    """A host worker capped at 2 MiB an image and 3 MiB of cache, and an attacker's workflow."""
    (tmp_path / "host").mkdir()
    vm = make_instance(tmp_path / "host", running=False)
    config = WorkerConfig(
        host=unique_host,
        libvirt_uri=vm.libvirt.uri,
        state_dir=tmp_path / "host" / "state",
        allowed_image_networks=LOOPBACK_NETWORKS,
        max_image_bytes=2 * MIB,
        cache_quota_bytes=3 * MIB,
    )
    queue = f"attacker-{unique_host}"

    async def call(activity: str, argument: dict[str, Any]) -> str:
        handle = await client.start_workflow(
            Attacker.run,
            AttackCall(activity=activity, argument=argument, queue=host_task_queue(unique_host)),
            id=f"attack-{uuid.uuid4()}",
            task_queue=queue,
        )
        result: str = await handle.result()
        return result

    call.state = StateDir(config.state_dir)  # type: ignore[attr-defined]
    async with (
        Worker(client, task_queue=queue, workflows=[Attacker]),
        Worker(
            client, task_queue=host_task_queue(unique_host), activities=host_activities(config, vm.libvirt)
        ),
    ):
        yield call


def _publish(server: ImageServer, name: str, size: int) -> str:
    (server.directory / name).write_bytes(random.randbytes(size))
    return server.url(name)


def _leftovers(state: StateDir) -> list[str]:
    return sorted(p.name for p in state.partial.iterdir() if p.suffix == ".part")


async def test_an_image_over_the_workers_cap_is_refused_whatever_max_bytes_says(
    attack: Any, images: ImageServer
) -> None:
    url = _publish(images, "big.raw", 3 * MIB)
    answer = await attack("fetch_image", {"url": url, "max_bytes": 1 << 60})
    assert answer.startswith(f"ImageTooLarge: image at {url} is {3 * MIB} bytes, over the limit of {2 * MIB}")
    assert "this worker's --max-image-gib" in answer
    assert _leftovers(attack.state) == [] and cache_usage(attack.state) == 0


async def test_the_cache_quota_refuses_an_image_before_its_download(attack: Any, images: ImageServer) -> None:
    first = _publish(images, "first.raw", 2 * MIB)
    assert await attack("fetch_image", {"url": first, "max_bytes": 1 << 40}) == "accepted"
    second = _publish(images, "second.raw", 2 * MIB)

    answer = await attack("fetch_image", {"url": second, "max_bytes": 1 << 40})

    assert answer.startswith(f"CacheQuotaExceeded: the image at {second} needs {2 * MIB} more bytes"), answer
    assert f"its quota of {3 * MIB} bytes" in answer and "rebuild cache prune" in answer
    assert images.bytes_sent("second.raw") == 0 or _leftovers(attack.state) == []
    assert cache_usage(attack.state) == 2 * MIB


async def test_a_server_that_hides_the_size_is_stopped_at_the_quota(attack: Any, images: ImageServer) -> None:
    assert await attack("fetch_image", {"url": _publish(images, "a.raw", 2 * MIB), "max_bytes": 1 << 40}) == (
        "accepted"
    )
    url = _publish(images, "hidden.raw", 2 * MIB - 1)
    images.faults["hidden.raw"] = Fault(hide_length=True, times=10)
    answer = await attack("fetch_image", {"url": url, "max_bytes": 1 << 40})
    assert answer.startswith(f"CacheQuotaExceeded: the image at {url} needs"), answer
    assert _leftovers(attack.state) == []
    assert cache_usage(attack.state) == 2 * MIB


async def test_a_full_cache_takes_nothing_more_not_even_a_connection(
    attack: Any, images: ImageServer
) -> None:
    for name in ("one.raw", "two.raw"):
        url = _publish(images, name, 3 * MIB // 2)
        assert await attack("fetch_image", {"url": url, "max_bytes": 1 << 40}) == "accepted"
    url = _publish(images, "three.raw", 1)
    answer = await attack("fetch_image", {"url": url, "max_bytes": 1 << 40})
    assert answer.startswith("CacheQuotaExceeded: "), answer
    assert [r.path for r in images.requests if r.path == "three.raw"] == []


@pytest.mark.parametrize("option", [["--max-image-gib", "0"], ["--cache-quota-gib", "-1"]])
def test_the_worker_refuses_nonsense_limits(tmp_path: Path, option: list[str]) -> None:
    done = subprocess.run(
        [str(Path(sys.executable).parent / "rebuild-worker"), "--address", "127.0.0.1:1",
         "--state-dir", str(tmp_path), *option],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "Invalid value" in done.stderr
