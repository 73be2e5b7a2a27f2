"""Pre-flight on the real Debian guest: a broken image fails in a sandbox while the instance serves on.

Each broken image really boots in the sandbox (its kernel's last words are in the error) and the
instance is never touched: the same domain ID, no new boot on its console, its agent answering from the
image it had. A worker killed while its sandbox runs leaves none behind once the retry is done, and the
good image then passes and the rebuild completes.
"""

from __future__ import annotations

from typing import Any

import pytest
from temporalio.client import Client

from devtools.image_server import ImageServer
from devtools.real_guest import RealGuestImages, image_sha256
from devtools.temporal_dev import DevServer
from devtools.testbed.e2e import Guest, WorkerProcess, rebuild_cli, wait_for_file
from devtools.testbed.real_guest import (
    BOOT_SECONDS,
    SHARED_GUEST,
    image_in_guest,
    rebuild,
    wait_for_agent,
)
from tests.test_faults import handle_for
from tests.test_preflight import sandbox_files, sandboxes

pytestmark = [pytest.mark.timeout(1800), SHARED_GUEST]
# A broken image never passes, so its pre-flight always lasts this long: long enough under a loaded TCG
# for the kernel to have panicked, or systemd to have given up, and printed why.
BROKEN_BOOT_SECONDS = "90"


def assert_untouched(
    guest: Guest, domain_id: int, image: str, console_before: int, worker: WorkerProcess
) -> None:
    assert guest.domain.isActive() and guest.domain.ID() == domain_id
    assert "reached multi-user" not in guest.console()[console_before:]  # it never booted again
    wait_for_agent(guest, 10)
    assert image_in_guest(guest) == image
    assert sandboxes(guest.conn, worker) == [] and sandbox_files(worker) == []
    assert guest.leftovers() == []


@pytest.mark.parametrize(
    ("image", "last_words", "at_once"),
    [
        # A panic on the sandbox's console ends pre-flight there and then; a boot that merely stalls
        # has its whole boot timeout.
        ("panic.qcow2", "Kernel panic - not syncing", True),
        ("stuck.qcow2", "emergency mode", False),
    ],
    ids=["kernel-panics", "never-reaches-multi-user"],
)
async def test_an_image_that_does_not_boot_fails_preflight_and_the_instance_never_stops(
    real_guest: Guest,
    real_worker: WorkerProcess,
    served: ImageServer,
    dev_server: DevServer,
    image: str,
    last_words: str,
    at_once: bool,
) -> None:
    domain_id, running = real_guest.domain.ID(), image_in_guest(real_guest)
    console_before = len(real_guest.console())

    result = await rebuild(
        real_worker,
        dev_server,
        real_guest,
        served.url(image),
        "--preflight",
        "--boot-timeout",
        BROKEN_BOOT_SECONDS,
    )

    assert result.code == 1, result.stdout + result.stderr
    outcome: dict[str, Any] = result.json()
    assert (outcome["outcome"], outcome["failed_step"]) == ("unchanged", "preflight"), outcome
    assert outcome["error_type"] == "PreflightFailed"
    assert "the instance was never stopped" in outcome["error"]
    assert last_words in outcome["error"]  # the sandbox's console: the image really booted there
    took = outcome["step_seconds"]["preflight"]
    assert took < float(BROKEN_BOOT_SECONDS) if at_once else took >= float(BROKEN_BOOT_SECONDS), took
    assert outcome["downtime_seconds"] is None and outcome["stopped_by"] is None
    assert_untouched(real_guest, domain_id, running, console_before, real_worker)


async def test_an_empty_image_is_refused_before_preflight_and_the_instance_never_stops(
    real_guest: Guest, real_worker: WorkerProcess, served: ImageServer, dev_server: DevServer
) -> None:
    domain_id, running = real_guest.domain.ID(), image_in_guest(real_guest)
    console_before = len(real_guest.console())

    result = await rebuild(real_worker, dev_server, real_guest, served.url("empty.raw"), "--preflight")

    assert result.code == 1, result.stdout + result.stderr
    outcome: dict[str, Any] = result.json()
    assert (outcome["outcome"], outcome["failed_step"], outcome["error_type"]) == (
        "unchanged",
        "check",
        "EmptyImage",
    ), outcome
    assert_untouched(real_guest, domain_id, running, console_before, real_worker)


async def test_a_worker_killed_in_preflight_leaves_no_sandbox_and_the_good_image_then_passes(
    real_guest: Guest,
    real_worker: WorkerProcess,
    served: ImageServer,
    dev_server: DevServer,
    real_images: RealGuestImages,
    client: Client,
) -> None:
    assert real_worker.pause_dir is not None
    gate = real_worker.pause_dir / "preflight.after-create"
    gate.touch()
    target, url, sha = (
        ("B", "b.qcow2", real_images.b)
        if image_in_guest(real_guest) == "A"
        else ("A", "a.qcow2", real_images.a)
    )
    try:
        started = await rebuild_cli(
            dev_server.address,
            "start", real_guest.name, "--image", served.url(url), "--sha256", image_sha256(sha),
            "--host", real_worker.host, "--preflight", "--boot-timeout", str(BOOT_SECONDS),
        )  # fmt: skip
        assert started.code == 0, started.stderr
        await wait_for_file(real_worker.pause_dir / "preflight.after-create.reached", timeout=300)
        assert len(sandboxes(real_guest.conn, real_worker)) == 1
        domain_id = real_guest.domain.ID()
        real_worker.kill()
    finally:
        gate.unlink()
        if real_worker.process is None or real_worker.process.poll() is not None:
            real_worker.start()
    assert real_guest.domain.ID() == domain_id  # the instance ran on through the crash

    result = await handle_for(client, real_worker, real_guest).result()

    assert result.outcome == "rebuilt", result
    assert "preflight" in result.step_seconds
    assert sandboxes(real_guest.conn, real_worker) == [] and sandbox_files(real_worker) == []
    wait_for_agent(real_guest)
    assert image_in_guest(real_guest) == target
