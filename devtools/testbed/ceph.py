"""A throwaway single-node Ceph cluster for the RBD tests: one monitor, one manager, one OSD on a file.

Everything lives in one directory (its own ``ceph.conf``, fsid, keyrings, daemon data, logs, sockets);
the monitor listens on a free port on localhost (msgr v1 only, which QEMU's librbd reaches by
``<host name='127.0.0.1' port=.../>``), the OSD keeps BlueStore in a sparse file. The daemons run in
the foreground as children of the test process (never a system service) and go when it stops them;
the host's ``/etc/ceph`` is not read or written. With cephx on, the client key of ``client.rebuild``
(limited to the pool) is also held by a libvirt secret, as on a Nova compute host.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from devtools.guest import write_image
from devtools.temporal_dev import free_port
from devtools.testbed.shapes import Bed, Shaped, disk_of

DAEMONS = ("ceph-mon", "ceph-mgr", "ceph-osd", "ceph-authtool", "monmaptool", "ceph", "rbd")
CLIENT = "rebuild"
OSD_FILE_BYTES = 4 << 30


class CephError(RuntimeError):
    """The test cluster could not be made or started (the message names the step and its output)."""


@dataclass
class CephCluster:
    """A running test cluster: where its files are, how to reach it, the pool and client key."""

    directory: Path
    port: int
    pool: str = "rbd"
    client: str = CLIENT
    client_key: str = ""
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    secret_uuid: str = ""
    started_in: float = 0.0

    @property
    def conf(self) -> Path:
        return self.directory / "ceph.conf"

    @property
    def admin_keyring(self) -> Path:
        return self.directory / "admin.keyring"

    def run(self, *args: str, input_text: str | None = None) -> str:
        """A ``ceph`` command as client.admin on this cluster; its output (CephError when it fails)."""
        return _run(["ceph", "--conf", str(self.conf), "--keyring", str(self.admin_keyring),
                     "--connect-timeout", "20", *args], input_text)  # fmt: skip

    def rbd(self, *args: str) -> str:
        """An ``rbd`` command as client.admin on this cluster's pool."""
        return _run(["rbd", "--conf", str(self.conf), "--keyring", str(self.admin_keyring), *args], None)

    def images(self) -> set[str]:
        return set(json.loads(self.rbd("ls", "--pool", self.pool, "--format", "json") or "[]"))

    def disk_source(self, image: str) -> str:
        """The ``<source>`` and ``<auth>`` of a ``<disk type='network'>`` on ``image`` of the pool."""
        return (
            f"<auth username='{self.client}'><secret type='ceph' uuid='{self.secret_uuid}'/></auth>"
            f"<source protocol='rbd' name='{self.pool}/{image}'>"
            f"<host name='127.0.0.1' port='{self.port}'/></source>"
        )

    def stop(self) -> None:
        for process in reversed(self.processes):
            process.terminate()
        for process in reversed(self.processes):
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.processes.clear()


def _run(args: list[str], input_text: str | None) -> str:
    try:
        done = subprocess.run(args, input=input_text, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired as err:
        raise CephError(f"{' '.join(args[:3])} ... did not finish in 120 s") from err
    if done.returncode != 0:
        raise CephError(f"{' '.join(args)} failed ({done.returncode}): {done.stderr.strip()[-800:]}")
    return done.stdout.strip()


def _conf(directory: Path, fsid: str, port: int) -> str:
    ports = 20000 + (port % 200) * 100
    return f"""[global]
fsid = {fsid}
mon host = v1:127.0.0.1:{port}
public addr = 127.0.0.1
ms bind msgr2 = false
ms bind ipv6 = false
ms bind port min = {ports}
ms bind port max = {ports + 99}
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
run dir = {directory}/run
admin socket = {directory}/run/$name.asok
log file = {directory}/log/$name.log
pid file = {directory}/run/$name.pid
crash dir = {directory}/crash
osd pool default size = 1
osd pool default min size = 1
osd pool default pg autoscale mode = off
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
osd crush chooseleaf type = 0
osd objectstore = bluestore
bluestore block create = true
bluestore block size = {OSD_FILE_BYTES}
bluestore cache size = 64M
osd memory target = 939524096
mon data avail warn = 1
mon data avail crit = 0

[mon]
mon data = {directory}/mon/$cluster-$id
[mgr]
mgr data = {directory}/mgr/$cluster-$id
mgr initial modules =
[osd]
osd data = {directory}/osd/$cluster-$id
"""


def _daemon(cluster: CephCluster, *args: str) -> None:
    log = open(cluster.directory / "log" / f"{args[0]}.out", "ab")  # noqa: SIM115 (the child keeps it)
    process = subprocess.Popen(
        [*args, "--conf", str(cluster.conf), "-f"],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    log.close()
    cluster.processes.append(process)


def _wait(what: str, ready: Any, cluster: CephCluster, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        dead = [str(p.args[0]) for p in cluster.processes if p.poll() is not None]  # type: ignore[index]
        if dead or time.monotonic() > deadline:
            logs = sorted((cluster.directory / "log").glob("*"))
            tail = "".join(p.read_text(errors="replace")[-600:] for p in logs)
            raise CephError(f"{what}: {'exited: ' + ', '.join(dead) if dead else 'timed out'}\n{tail}")
        time.sleep(0.3)


def start_cluster(directory: Path) -> CephCluster:
    """A new cluster in ``directory`` with the pool ``rbd`` and client.rebuild's key; CephError if not."""
    missing = [tool for tool in DAEMONS if shutil.which(tool) is None]
    if missing:
        raise CephError(f"{', '.join(missing)} missing (scripts/setup-host.sh installs Ceph's packages)")
    began = time.monotonic()
    fsid = str(uuid.uuid4())
    cluster = CephCluster(directory, free_port())
    for sub in ("run", "log", "crash", "mon/ceph-a", "mgr/ceph-x", "osd/ceph-0"):
        (directory / sub).mkdir(parents=True, exist_ok=True)
    cluster.conf.write_text(_conf(directory, fsid, cluster.port))
    try:
        _make_and_start(cluster, fsid)
    except BaseException:
        cluster.stop()
        raise
    cluster.started_in = time.monotonic() - began
    return cluster


def _make_and_start(cluster: CephCluster, fsid: str) -> None:
    d = cluster.directory
    mon_keyring, admin = d / "mon.keyring", cluster.admin_keyring
    _run(["ceph-authtool", "--create-keyring", str(mon_keyring), "--gen-key", "-n", "mon.",
          "--cap", "mon", "allow *"], None)  # fmt: skip
    _run(["ceph-authtool", "--create-keyring", str(admin), "--gen-key", "-n", "client.admin",
          "--cap", "mon", "allow *", "--cap", "osd", "allow *", "--cap", "mgr", "allow *"], None)  # fmt: skip
    _run(["ceph-authtool", str(mon_keyring), "--import-keyring", str(admin)], None)
    _run(["monmaptool", "--create", "--addv", "a", f"[v1:127.0.0.1:{cluster.port}]", "--fsid", fsid,
          str(d / "monmap")], None)  # fmt: skip
    _run(["ceph-mon", "--conf", str(cluster.conf), "--mkfs", "-i", "a", "--monmap", str(d / "monmap"),
          "--keyring", str(mon_keyring)], None)  # fmt: skip
    _daemon(cluster, "ceph-mon", "-i", "a")
    _wait("the monitor", lambda: _answers(cluster), cluster)

    cluster.run("auth", "get-or-create", "mgr.x", "mon", "allow profile mgr", "osd", "allow *",
                "-o", str(d / "mgr/ceph-x/keyring"))  # fmt: skip
    _daemon(cluster, "ceph-mgr", "-i", "x")

    osd_uuid, secret = str(uuid.uuid4()), _run(["ceph-authtool", "--gen-print-key"], None)
    osd_id = cluster.run("osd", "new", osd_uuid, "-i", "-", input_text=json.dumps({"cephx_secret": secret}))
    if osd_id != "0":
        raise CephError(f"the new OSD got id {osd_id!r}, not 0")
    osd_dir = d / "osd/ceph-0"
    _run(["ceph-authtool", "--create-keyring", str(osd_dir / "keyring"), "--name", "osd.0",
          "--add-key", secret], None)  # fmt: skip
    _run(["ceph-osd", "--conf", str(cluster.conf), "-i", "0", "--mkfs", "--osd-uuid", osd_uuid], None)
    _daemon(cluster, "ceph-osd", "-i", "0")
    _wait("the OSD", lambda: _osd_up(cluster), cluster)

    cluster.run("osd", "pool", "create", cluster.pool, "8", "8")
    cluster.rbd("pool", "init", cluster.pool)
    cluster.client_key = cluster.run(
        "auth", "get-or-create-key", f"client.{cluster.client}", "mon", "profile rbd",
        "osd", f"profile rbd pool={cluster.pool}", "mgr", f"profile rbd pool={cluster.pool}",
    )  # fmt: skip


def _answers(cluster: CephCluster) -> bool:
    try:
        cluster.run("mon", "stat")
    except CephError:
        return False
    return True


def _osd_up(cluster: CephCluster) -> bool:
    try:
        return bool(json.loads(cluster.run("osd", "stat", "--format", "json")).get("num_up_osds") == 1)
    except CephError:
        return False


def define_secret(conn: Any, cluster: CephCluster) -> Any:
    """A libvirt secret of usage ``ceph`` holding the client key (readable, as Nova defines it)."""
    cluster.secret_uuid = str(uuid.uuid4())
    secret = conn.secretDefineXML(
        f"<secret ephemeral='no' private='no'><uuid>{cluster.secret_uuid}</uuid>"
        f"<usage type='ceph'><name>client.{cluster.client} test {cluster.secret_uuid[:8]}</name></usage>"
        "</secret>"
    )
    secret.setValue(base64.b64decode(cluster.client_key))
    return secret


def rbd_guest(bed: Bed, cluster: CephCluster, marker: str = "image A", size: int = 4 << 20) -> Shaped:
    """A running guest whose root disk is a new RBD image that boots ``marker``."""
    image = f"root-{uuid.uuid4().hex[:8]}"
    staging = write_image(bed.directory / f"{image}.raw", marker, size=size)
    cluster.rbd("import", "--no-progress", str(staging), f"{cluster.pool}/{image}")
    devices = (
        f"<disk type='network' device='disk'><driver name='qemu' type='raw'/>{cluster.disk_source(image)}"
        "<target dev='vda' bus='virtio'/><boot order='1'/></disk>"
    )
    return bed.define(staging, devices)


def rbd_image_of(definition: str) -> str:
    """The RBD image (POOL/NAME) a definition's root disk vda names."""
    source = disk_of(definition, "vda").find("source")
    assert source is not None and source.get("protocol") == "rbd", definition
    return str(source.get("name"))
