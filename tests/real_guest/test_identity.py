"""Nova's rebuild options on the real Debian guest: what cloud-init made of them, read through the agent.

The image has cloud-init as a stock cloud image has it, off until a datasource appears; the rebuild's
NoCloud seed (a read-only CD-ROM labelled ``cidata``) is that datasource. Every rebuild gives the guest a
fresh root disk, so whatever identity it has afterwards came from the seed: its host name, the key in the
default user's ``authorized_keys``, the file the user-data script wrote, root's password hash.
"""

from __future__ import annotations

import base64
import os
import uuid
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import libvirt
import pytest
from passlib.hash import sha512_crypt

from activities.domain_xml import SEED_ALIAS, current_identity
from activities.seed_image import read_seed
from devtools.image_server import ImageServer
from devtools.real_guest import RealGuestImages, image_sha256
from devtools.temporal_dev import DevServer
from devtools.testbed.e2e import CliResult, Guest, WorkerProcess
from devtools.testbed.real_guest import (
    BOOT_SECONDS,
    IDENTITY_GUEST,
    guest_exec,
    image_in_guest,
    read_in_guest,
    rebuild,
    wait_for_agent,
)
from workflows.identity import GuestIdentity

pytestmark = [pytest.mark.timeout(2400), IDENTITY_GUEST]
# Debian's cloud-init puts the keys with its default user, "debian".
AUTHORIZED_KEYS = "/home/debian/.ssh/authorized_keys"
SCRIPT_OUTPUT = "/var/lib/rebuild-user-data"
SCRIPT = f'#!/bin/sh\necho "user data ran on $(hostname)" > {SCRIPT_OUTPUT}\n'
PASSWORD = "correct horse battery staple"


@dataclass(frozen=True)
class Seen:
    """The guest's identity as the guest itself reports it, once cloud-init is done."""

    hostname: str
    keys: str | None
    script_output: str | None
    root_hash: str


@dataclass(frozen=True)
class Seed:
    """The instance's identity as libvirt holds it: the recorded options and the seed CD-ROM's files."""

    identity: GuestIdentity | None
    label: str
    files: dict[str, bytes]

    @property
    def instance_id(self) -> str:
        for line in self.files["meta-data"].decode().splitlines():
            if line.startswith("instance-id:"):
                return line.split(":", 1)[1].strip()
        raise AssertionError(f"the seed has no instance-id: {self.files['meta-data']!r}")


def public_key(comment: str) -> str:
    """A well-formed ed25519 public key (nobody holds its private half)."""
    kind = b"ssh-ed25519"
    blob = len(kind).to_bytes(4, "big") + kind + (32).to_bytes(4, "big") + os.urandom(32)
    return f"ssh-ed25519 {base64.b64encode(blob).decode()} {comment}"


def seen_in(guest: Guest) -> Seen:
    wait_for_agent(guest)
    # The agent answers before cloud-init's last stage is done: wait for it, and for it to be happy.
    done = guest_exec(guest, "/usr/bin/cloud-init", "status", "--wait", "--long", timeout=BOOT_SECONDS)
    assert done.code == 0, f"cloud-init did not finish cleanly in the guest: {done.out}{done.err}"
    shadow = read_in_guest(guest, "/etc/shadow") or ""
    root = next(line for line in shadow.splitlines() if line.startswith("root:"))
    return Seen(
        hostname=guest_exec(guest, "/bin/hostname").out.strip(),
        keys=read_in_guest(guest, AUTHORIZED_KEYS),
        script_output=read_in_guest(guest, SCRIPT_OUTPUT),
        root_hash=root.split(":")[1],
    )


def seed_of(guest: Guest) -> Seed:
    xml = ET.fromstring(guest.domain.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
    sources = [
        disk.find("source")
        for disk in xml.findall("./devices/disk[@device='cdrom']")
        if (alias := disk.find("alias")) is not None and alias.get("name") == SEED_ALIAS
    ]
    assert len(sources) == 1 and sources[0] is not None, ET.tostring(xml).decode()
    label, files = read_seed(Path(str(sources[0].get("file"))))
    return Seed(current_identity(xml), label, files)


def assert_rebuilt(result: CliResult) -> None:
    assert result.code == 0, result.stdout + result.stderr
    assert result.json()["outcome"] == "rebuilt"


async def test_identity_reaches_the_guest_is_kept_rolled_back_and_removed(
    real_guest: Guest,
    real_worker: WorkerProcess,
    served: ImageServer,
    dev_server: DevServer,
    real_images: RealGuestImages,
    tmp_path: Path,
) -> None:
    key = public_key("operator@example")
    (tmp_path / "id.pub").write_text(key + "\n")
    (tmp_path / "user-data").write_text(SCRIPT)
    (tmp_path / "password").write_text(PASSWORD + "\n")
    hostname = f"rebuilt-{uuid.uuid4().hex[:6]}"
    to_a = (
        served.url("a.qcow2"),
        "--sha256",
        image_sha256(real_images.a),
        "--boot-timeout",
        str(BOOT_SECONDS),
    )
    to_b = (
        served.url("b.qcow2"),
        "--sha256",
        image_sha256(real_images.b),
        "--boot-timeout",
        str(BOOT_SECONDS),
    )

    # Given: a key, a host name, a user-data script and a root password, as Nova's rebuild takes them.
    result = await rebuild(
        real_worker, dev_server, real_guest, *to_b,
        "--ssh-key", str(tmp_path / "id.pub"), "--hostname", hostname,
        "--user-data", str(tmp_path / "user-data"), "--admin-password-file", str(tmp_path / "password"),
    )  # fmt: skip
    assert_rebuilt(result)
    given = seen_in(real_guest)
    assert image_in_guest(real_guest) == "B"
    assert given.hostname == hostname
    assert given.keys is not None and key in given.keys
    assert given.script_output == f"user data ran on {hostname}\n"
    assert sha512_crypt.verify(PASSWORD, given.root_hash)
    first = seed_of(real_guest)
    assert first.label == "cidata"
    assert PASSWORD.encode() not in b"".join(first.files.values())  # only its hash travels

    # Kept: a rebuild that names none of them gives the fresh disk the same identity, under a new
    # instance-id (so cloud-init runs its once-per-instance modules again).
    result = await rebuild(real_worker, dev_server, real_guest, *to_a)
    assert_rebuilt(result)
    kept = seen_in(real_guest)
    assert image_in_guest(real_guest) == "A"
    assert (kept.hostname, kept.script_output) == (hostname, given.script_output)
    assert kept.keys is not None and key in kept.keys
    assert sha512_crypt.verify(PASSWORD, kept.root_hash)
    second = seed_of(real_guest)
    assert second.instance_id != first.instance_id
    assert second.identity == first.identity

    # Rolled back: a rebuild that would drop the key and rename the guest, to a disk that boots
    # nothing, puts back the old seed (the same bytes, the same instance-id) and the old identity.
    result = await rebuild(
        real_worker, dev_server, real_guest, served.url("halts.raw"),
        "--no-ssh-keys", "--hostname", "not-kept", "--boot-timeout", "30",
    )  # fmt: skip
    assert result.code != 0, result.stdout
    # No --verify: the domain has a guest agent channel, so the agent must answer, and none does.
    failed = result.json()
    assert (failed["outcome"], failed["failed_step"]) == ("rolled-back", "verify"), failed
    assert "guest agent" in failed["error"]
    assert seed_of(real_guest) == second
    back = seen_in(real_guest)
    assert image_in_guest(real_guest) == "A"
    assert back.hostname == hostname
    assert back.keys is not None and key in back.keys

    # Removed: --no-ssh-keys, and the fresh disk has no key; what was not named is still kept.
    result = await rebuild(real_worker, dev_server, real_guest, *to_b, "--no-ssh-keys")
    assert_rebuilt(result)
    removed = seen_in(real_guest)
    assert image_in_guest(real_guest) == "B"
    assert key not in (removed.keys or "")
    assert removed.hostname == hostname
    assert removed.script_output == given.script_output
    third = seed_of(real_guest)
    assert third.identity is not None and third.identity.ssh_keys == ()
    assert key.encode() not in third.files["meta-data"]
