"""A hypervisor host for CLI tests: the real worker's host activities on libvirt's ``test:///`` driver,
on its own host queue, with a workflow worker on the shared queue, both named after the host (as
``rebuild-worker`` names itself, so the CLI finds the host among those with a worker)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.worker import Worker

import worker
from common.connection import worker_identity
from devtools.testbed.e2e import LOOPBACK_NETWORKS, rebuild_cli
from devtools.testbed.libvirt_test_driver import DriverInstance, make_instances
from workflows.fleet import FleetRebuild
from workflows.inventory import InstanceInventory
from workflows.models import WORKFLOW_TASK_QUEUE, host_task_queue
from workflows.rebuild import RebuildInstance

NARROW = {"COLUMNS": "80"}


@dataclass
class DriverHost:
    name: str
    address: str
    instances: list[DriverInstance]
    state_dir: Path

    async def cli(self, *args: str) -> tuple[int, str, str]:
        done = await rebuild_cli(self.address, *args, env=NARROW)
        return done.code, done.stdout, done.stderr


def make_root_disk_a_bare_block_device(host: DriverHost, index: int) -> None:
    """Instance ``index``'s root disk becomes /dev/sdz, a block device no pool manages: not supported."""
    instance = host.instances[index]
    conn = instance.libvirt.connection()
    xml = conn.lookupByName(instance.name).XMLDesc(0)
    xml = xml.replace("<disk type='file' device='disk'>", "<disk type='block' device='disk'>", 1)
    xml = xml.replace(f"<source file='{instance.disk}'", "<source dev='/dev/sdz'", 1)
    conn.defineXML(xml)


@asynccontextmanager
async def driver_host(
    address: str, host: str, directory: Path, names: list[str]
) -> AsyncIterator[DriverHost]:
    """Host ``host`` with an instance per name (raw file root disks under ``directory``), served.

    Through its own client, as a host's worker process has: one client may not run two workers on the
    shared queue, and two hosts in one test each have one.
    """
    client = await Client.connect(address, data_converter=pydantic_data_converter)
    directory.mkdir(parents=True, exist_ok=True)
    instances = make_instances(directory, names)
    config = worker.WorkerConfig(
        host=host,
        libvirt_uri=instances[0].libvirt.uri,
        state_dir=directory / "state",
        allowed_image_networks=LOOPBACK_NETWORKS,
    )
    identity = worker_identity(host)
    async with (
        Worker(
            client,
            task_queue=WORKFLOW_TASK_QUEUE,
            workflows=[RebuildInstance, FleetRebuild, InstanceInventory],
            identity=identity,
        ),
        Worker(
            client,
            task_queue=host_task_queue(host),
            activities=worker.host_activities(config, instances[0].libvirt),
            max_heartbeat_throttle_interval=worker.HEARTBEAT_THROTTLE,
            identity=identity,
        ),
    ):
        yield DriverHost(host, address, instances, config.state_dir)
