"""Many rebuilds of one image on one host at once: one download, every rebuild done.

Real activities (real qemu-img, real files, a real image server) on libvirt's ``test:///`` driver,
with the real workflow on the dev server.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from temporalio.client import Client
from temporalio.worker import Worker

from devtools.image_server import ImageServer
from devtools.testbed.e2e import LOOPBACK_NETWORKS, serve
from devtools.testbed.libvirt_test_driver import make_instances
from worker import WorkerConfig, host_activities
from workflows.models import RebuildRequest, host_task_queue, rebuild_workflow_id
from workflows.rebuild import RebuildInstance

INSTANCES = 20


async def test_twenty_concurrent_rebuilds_of_one_image_download_it_once(
    client: Client, unique_host: str, tmp_path: Path, images: ImageServer
) -> None:
    instances = make_instances(tmp_path, [f"vm-{n}" for n in range(INSTANCES)])
    conn = instances[0].libvirt
    config = WorkerConfig(
        host=unique_host,
        libvirt_uri=conn.uri,
        state_dir=tmp_path / "state",
        allowed_image_networks=LOOPBACK_NETWORKS,
    )
    url, sha = serve(images, "image B", "qcow2", size=64 << 20)
    queue = f"wf-{unique_host}"
    async with (
        Worker(client, task_queue=queue, workflows=[RebuildInstance]),
        Worker(
            client,
            task_queue=host_task_queue(unique_host),
            activities=host_activities(config, conn),
            max_concurrent_activities=200,
        ),
    ):
        handles = [
            await client.start_workflow(
                RebuildInstance.run,
                RebuildRequest(
                    instance=vm.name, host=unique_host, image_url=url, sha256=sha, stop_timeout_seconds=0
                ),
                id=rebuild_workflow_id(unique_host, vm.name),
                task_queue=queue,
            )
            for vm in instances
        ]
        results = await asyncio.gather(*(handle.result() for handle in handles))

    downloads = [r for r in images.requests if r.path == "image-B.qcow2" and r.status in (200, 206)]
    print(f"\n{INSTANCES} concurrent rebuilds of one image: {len(downloads)} download(s)")
    assert len(downloads) == 1
    assert [r.outcome for r in results] == ["rebuilt"] * INSTANCES
    assert sum(1 for r in results if r.image_sha256 == sha) == INSTANCES
    for vm in instances:
        assert vm.libvirt.connection().lookupByName(vm.name).isActive()
        assert list(tmp_path.glob(f"{vm.name}.img.rebuild-*")) == []
