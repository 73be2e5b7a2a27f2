"""Ceph RBD images through the ``rbd`` command, as a domain's ``<disk type='network' protocol='rbd'>``
reaches them: its monitors, its cephx user, and the key from the libvirt secret the disk names.

The ``rbd`` CLI, not librbd's Python bindings: those are distribution packages a virtual environment
cannot import. The key never goes on a command line (``ps`` shows those): it is written to a 0600
keyring in a private directory, with a ``ceph.conf`` naming the disk's monitors, both removed after.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from activities import libvirt_domain as ld
from activities.errors import DiskToolFailed, UnsupportedInstance
from activities.libvirt_secret import SecretUnreadable, ceph_secret_value
from activities.qemu_img import run_killable

# An unreachable monitor fails a call within this, not after librados's default of five minutes.
CONNECT_SECONDS = 10
CALL_SECONDS = 60.0
IMPORT_SECONDS = 2 * 3600.0


@dataclass(frozen=True)
class RbdSource:
    """What a disk's definition says of its RBD image: pool, image, monitors, user, secret."""

    pool: str
    image: str
    hosts: tuple[str, ...]
    user: str
    secret_uuid: str | None
    secret_usage: str | None

    @property
    def name(self) -> str:
        return f"{self.pool}/{self.image}"


def rbd_source(disk: ET.Element, where: str) -> RbdSource:
    """The disk's RBD source, refused (with the reason) where this back end cannot reach it as QEMU does."""
    source = disk.find("source")
    assert source is not None
    name = source.get("name", "")
    pool, _, image = name.partition("/")
    if not pool or not image or "/" in image or "@" in image or source.get("namespace"):
        raise UnsupportedInstance(
            f"{where}: RBD source name {name!r} is not POOL/IMAGE (namespaces and snapshots are not rebuilt)"
        )
    hosts = tuple(
        f"{h.get('name')}:{h.get('port')}" if h.get("port") else str(h.get("name"))
        for h in source.findall("host")
        if h.get("name")
    )
    if not hosts or source.find("config") is not None:
        raise UnsupportedInstance(
            f"{where}: the RBD disk names no monitor (<host name=... port=...>) but a ceph.conf; "
            "a rebuild reaches the cluster by the monitors the disk names"
        )
    auth = disk.find("auth")
    if auth is None:
        auth = source.find("auth")
    secret = auth.find("secret") if auth is not None else None
    if auth is None or secret is None or not auth.get("username"):
        raise UnsupportedInstance(
            f"{where}: the RBD disk has no cephx <auth username=...><secret type='ceph' .../></auth>; "
            "only cephx-authenticated RBD disks are rebuilt here"
        )
    return RbdSource(pool, image, hosts, str(auth.get("username")), secret.get("uuid"), secret.get("usage"))


def secret_key(conn: ld.Libvirt, source: RbdSource, where: str) -> str:
    """The cephx key (base64, as in a keyring) the libvirt secret named by the disk holds."""
    try:
        value = ceph_secret_value(conn, source.secret_uuid, source.secret_usage)
    except SecretUnreadable as err:
        raise UnsupportedInstance(
            f"{where}: {err}; a rebuild needs the cephx key of client.{source.user} its <auth> names "
            "to make the new image"
        ) from None
    return base64.b64encode(value).decode()


class Rbd:
    """``rbd`` against one cluster and pool, as one cephx user, through files in a private directory."""

    def __init__(self, directory: Path, source: RbdSource) -> None:
        self.conf = directory / "ceph.conf"
        self.source = source

    def _args(self, *args: str) -> list[str]:
        return ["rbd", "--conf", str(self.conf), "--id", self.source.user, *args]

    def call(self, *args: str) -> str:
        """One ``rbd`` command; its output. ``DiskToolFailed`` with rbd's own words where it fails."""
        try:
            done = subprocess.run(
                self._args(*args),
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=CALL_SECONDS,
            )
        except subprocess.TimeoutExpired:
            raise DiskToolFailed(f"rbd {args[0]} took longer than {CALL_SECONDS:g} s") from None
        if done.returncode != 0:
            raise DiskToolFailed(f"rbd {args[0]} {args[-1]} failed: {_last_words(done.stderr)}")
        return done.stdout

    def image(self, name: str) -> str:
        return f"{self.source.pool}/{name}"

    def info(self, name: str) -> dict[str, Any] | None:
        """``rbd info`` of the pool's image ``name``, None where there is no such image."""
        try:
            found: dict[str, Any] = json.loads(self.call("info", "--format", "json", self.image(name)))
        except DiskToolFailed as err:
            if "No such file or directory" in err.message and "error opening image" in err.message:
                return None
            raise
        return found

    def snapshots(self, name: str) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = json.loads(
            self.call("snap", "ls", "--format", "json", self.image(name))
        )
        return found

    def children(self, snapshot: str) -> list[str]:
        found = json.loads(self.call("children", "--format", "json", self.image(snapshot)))
        return [f"{c['pool']}/{c['image']}" for c in found]

    def names(self) -> list[str]:
        return [str(n) for n in json.loads(self.call("ls", "--format", "json", self.source.pool) or "[]")]

    def remove(self, name: str) -> None:
        self.call("rm", "--no-progress", self.image(name))

    async def import_file(self, path: Path, name: str) -> None:
        """A raw file into a new image (sparse: zeroes are not written); killed if the caller is cancelled."""
        command = self._args("import", "--no-progress", "--image-format", "2", str(path), self.image(name))
        code, _, err = await run_killable(command, IMPORT_SECONDS, "rbd import")
        if code != 0:
            raise DiskToolFailed(f"rbd import failed: {_last_words(err.decode(errors='replace'))}")


def _last_words(stderr: str) -> str:
    """rbd's own message: its last line that is not a messenger's chatter."""
    lines = [
        line for line in stderr.strip().splitlines() if line.strip() and "_handle_peer_banner" not in line
    ]
    return lines[-1].strip()[:300] if lines else "no message"


@contextlib.contextmanager
def rbd_session(
    conn: ld.Libvirt, source: RbdSource, where: str, directory: Path | None = None
) -> Iterator[Rbd]:
    """An ``Rbd`` with the disk's monitors and key in a private directory (under ``directory``, a
    worker's state), removed on the way out whatever happens."""
    key = secret_key(conn, source, where)
    if shutil.which("rbd") is None:
        raise UnsupportedInstance(f"{where}: the rbd command is missing on this host (install ceph-common)")
    if directory is not None:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    private = Path(tempfile.mkdtemp(prefix="rbd-", dir=directory))
    try:
        keyring = private / "keyring"
        descriptor = os.open(keyring, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as out:
            out.write(f"[client.{source.user}]\n\tkey = {key}\n")
        (private / "ceph.conf").write_text(
            "[global]\n"
            f"mon host = {','.join(source.hosts)}\n"
            f"keyring = {keyring}\n"
            f"client mount timeout = {CONNECT_SECONDS}\n"
            f"rados mon op timeout = {CONNECT_SECONDS}\n"
            f"rados osd op timeout = {int(CALL_SECONDS)}\n"
            "log to stderr = false\nerr to stderr = true\n"
        )
        yield Rbd(private, source)
    finally:
        shutil.rmtree(private, ignore_errors=True)
