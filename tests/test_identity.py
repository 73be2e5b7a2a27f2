"""The guest's identity on rebuild: Nova's options, the cloud-init seed, its undo, and secrets kept out.

The seed is checked by reading the ISO back; the workflow runs with the real activities on libvirt's
test driver; the CLI refuses bad identity input before anything starts.
"""

from __future__ import annotations

import email
import json
import os
import subprocess
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import libvirt
import pytest
from aiohttp.test_utils import TestClient, TestServer
from google.protobuf import json_format
from passlib.hash import sha512_crypt
from temporalio.api.common.v1 import Payloads
from temporalio.client import Client, WorkflowFailureError
from temporalio.worker import Worker

from activities.domain_xml import current_identity, with_seed
from activities.errors import UnsupportedInstance
from activities.identity_store import IdentityStore
from activities.seed_image import build_seed, read_seed
from activities.state import StateDir
from common.codec import KEY_ENV, EncryptionCodec, data_converter, load_key
from devtools.image_server import ImageServer
from devtools.temporal_dev import DevServer
from devtools.testbed.e2e import LOOPBACK_NETWORKS, rebuild_cli, serve
from devtools.testbed.fake_host import FakeHost
from devtools.testbed.libvirt_test_driver import DriverInstance, make_instance
from starter.api_clients import ApiClients
from starter.codec_server import build_app
from starter.identity_options import hash_password
from tests.history_recorder import record_history
from worker import WorkerConfig, host_activities
from workflows.identity import GuestIdentity, IdentityChange, identity_problems
from workflows.models import WORKFLOW_TASK_QUEUE, RebuildRequest, host_task_queue, rebuild_workflow_id
from workflows.rebuild import RebuildInstance

KEY_A = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKeyAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA alice@example"
KEY_B = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKeyBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBB bob@example"
SCRIPT = "#!/bin/sh\necho rebuilt > /root/marker\n"


# --- Nova's rules -----------------------------------------------------------------------------------


def test_an_option_not_given_keeps_an_empty_one_removes() -> None:
    current = GuestIdentity(hostname="web-1", ssh_keys=(KEY_A,), user_data=SCRIPT, metadata={"a": "1"})
    assert IdentityChange().applied_to(current) == current
    changed = IdentityChange(hostname="web-2", ssh_keys=(), user_data="", metadata={"b": "2"})
    assert changed.applied_to(current) == GuestIdentity(hostname="web-2", metadata={"b": "2"})
    assert IdentityChange(seed_format="config-drive").applied_to(current).seed_format == "config-drive"


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (IdentityChange(hostname="-bad-.example"), "RFC 1123"),
        (IdentityChange(hostname="a" * 64), "RFC 1123"),
        (IdentityChange(user_data="x" * (64 << 10 | 1)), "at most 65536"),
        (IdentityChange(ssh_keys=("not a key",)), "not an OpenSSH public key"),
        (IdentityChange(admin_password_hash="hunter2"), "SHA-512 crypt"),
        (IdentityChange(metadata={"k" * 256: "v"}), "metadata"),
    ],
)
def test_bad_identity_input_is_named(change: IdentityChange, problem: str) -> None:
    problems = identity_problems(change)
    assert len(problems) == 1
    assert problem in problems[0]


def test_passwords_are_hashed_with_sha512_crypt() -> None:
    hashed = hash_password("correct horse")
    assert hashed.startswith("$6$")
    assert sha512_crypt.verify("correct horse", hashed)
    assert identity_problems(IdentityChange(admin_password_hash=hashed)) == []


# --- the seed, read back ----------------------------------------------------------------------------


def test_nocloud_seed_holds_meta_data_and_user_data(tmp_path: Path) -> None:
    identity = GuestIdentity(
        hostname="web-1",
        ssh_keys=(KEY_A, KEY_B),
        user_data=SCRIPT,
        admin_password_hash=hash_password("secret-4711"),
    )
    build_seed(identity, "iid-1", tmp_path / "seed.iso")
    label, files = read_seed(tmp_path / "seed.iso")
    assert label == "cidata"
    assert sorted(files) == ["meta-data", "user-data"]
    meta = files["meta-data"].decode()
    assert 'instance-id: "iid-1"' in meta and 'local-hostname: "web-1"' in meta
    assert KEY_A in meta and KEY_B in meta
    parts = [p for p in email.message_from_bytes(files["user-data"]).walk() if not p.is_multipart()]
    assert [p.get_content_type() for p in parts] == ["text/cloud-config", "text/x-shellscript"]
    ours, script = (bytes(p.get_payload(decode=True)).decode() for p in parts)
    assert str(identity.admin_password_hash) in ours and "secret-4711" not in ours
    assert script == SCRIPT
    # blkid, as the guest's udev sees it.
    probe = subprocess.run(
        ["blkid", "-o", "export", str(tmp_path / "seed.iso")], capture_output=True, text=True, check=True
    )
    assert "LABEL=cidata" in probe.stdout and "TYPE=iso9660" in probe.stdout


def test_config_drive_seed_has_nova_layout(tmp_path: Path) -> None:
    identity = GuestIdentity(
        hostname="web-1",
        name="Web one",
        ssh_keys=(KEY_A,),
        metadata={"role": "web"},
        seed_format="config-drive",
    )
    build_seed(identity, "iid-2", tmp_path / "seed.iso")
    label, files = read_seed(tmp_path / "seed.iso")
    assert label == "config-2"
    meta = json.loads(files["openstack/latest/meta_data.json"])
    assert meta == {
        "uuid": "iid-2",
        "hostname": "web-1",
        "name": "Web one",
        "public_keys": {"key-0": KEY_A},
        "meta": {"role": "web"},
    }
    assert files["openstack/latest/user_data"] == b"#cloud-config\nmanage_etc_hosts: true\n"


def test_no_free_ide_slot_is_refused_before_anything_changes() -> None:
    xml = ET.fromstring(
        "<domain><uuid>u</uuid><os><type arch='x86_64' machine='pc'>hvm</type></os><devices>"
        + "".join(f"<disk device='disk'><target dev='hd{c}' bus='ide'/></disk>" for c in "abcd")
        + "</devices></domain>"
    )
    with pytest.raises(UnsupportedInstance, match="no free ide slot"):
        with_seed(xml, "vm-1", "/x.iso", GuestIdentity())


# --- the rebuild: seed attached, kept, changed, and put back by a rollback --------------------------


def definition(vm: DriverInstance) -> ET.Element:
    domain = vm.libvirt.connection().lookupByName(vm.name)
    return ET.fromstring(domain.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))


def seed_of(vm: DriverInstance) -> Path | None:
    for disk in definition(vm).findall("./devices/disk[@device='cdrom']"):
        source = disk.find("source")
        if source is not None:
            return Path(str(source.get("file")))
    return None


@pytest.fixture
async def host(client: Client, unique_host: str, tmp_path: Path) -> AsyncIterator[tuple[DriverInstance, Any]]:
    vm = make_instance(tmp_path, running=True)
    config = WorkerConfig(
        host=unique_host,
        libvirt_uri=vm.libvirt.uri,
        state_dir=tmp_path / "state",
        allowed_image_networks=LOOPBACK_NETWORKS,
    )
    queue = f"wf-{unique_host}"

    async def rebuild(url: str, sha: str, history: str | None = None, **fields: Any) -> Any:
        request = RebuildRequest(
            instance=vm.name, host=unique_host, image_url=url, sha256=sha, stop_timeout_seconds=0, **fields
        )
        handle = await client.start_workflow(
            RebuildInstance.run, request, id=rebuild_workflow_id(unique_host, vm.name), task_queue=queue
        )
        try:
            return await handle.result()
        finally:
            if history is not None:
                await record_history(handle, history)

    async with (
        Worker(client, task_queue=queue, workflows=[RebuildInstance]),
        Worker(
            client, task_queue=host_task_queue(unique_host), activities=host_activities(config, vm.libvirt)
        ),
    ):
        yield vm, rebuild


async def test_identity_is_given_kept_changed_and_rolled_back(
    host: tuple[DriverInstance, Any], images: ImageServer, tmp_path: Path
) -> None:
    vm, rebuild = host

    def recorded() -> GuestIdentity | None:
        # The domain holds the public part; the user data comes from the state dir's secrets file.
        return IdentityStore(StateDir(tmp_path / "state")).load(definition(vm))

    url, sha = serve(images, "image B", "raw")
    assert seed_of(vm) is None

    await rebuild(
        url,
        sha,
        history="rebuild-with-identity",
        identity=IdentityChange(hostname="web-1", ssh_keys=(KEY_A,), user_data=SCRIPT),
    )
    first = seed_of(vm)
    assert first is not None and first.parent == vm.disk.parent
    _, files = read_seed(first)
    assert b"web-1" in files["meta-data"] and KEY_A.encode() in files["meta-data"]
    assert current_identity(definition(vm)) == GuestIdentity(hostname="web-1", ssh_keys=(KEY_A,))
    assert recorded() == GuestIdentity(hostname="web-1", ssh_keys=(KEY_A,), user_data=SCRIPT)

    # No identity options: the instance keeps its identity, under a new instance-id.
    await rebuild(url, sha, history="rebuild-keeping-identity")
    second = seed_of(vm)
    assert second is not None and second != first and not first.exists()
    _, again = read_seed(second)
    assert again["user-data"] == files["user-data"]
    assert again["meta-data"] != files["meta-data"]  # the instance-id changed
    assert b"web-1" in again["meta-data"]

    await rebuild(url, sha, identity=IdentityChange(ssh_keys=()))
    third = seed_of(vm)
    assert third is not None
    assert recorded() == GuestIdentity(hostname="web-1", user_data=SCRIPT)

    # A rebuild that fails after the seed step puts the previous seed and identity back.
    with pytest.raises(WorkflowFailureError):
        await rebuild(
            url,
            sha,
            history="rebuild-with-identity-rolled-back",
            identity=IdentityChange(hostname="web-9"),
            boot_marker="never",
            boot_timeout_seconds=1,
        )
    assert seed_of(vm) == third and third.exists()
    assert recorded() == GuestIdentity(hostname="web-1", user_data=SCRIPT)
    assert sorted(p.name for p in vm.disk.parent.glob(f"{vm.disk.name}.*")) == [third.name]


# --- the CLI: bad input before anything starts, and no secret in the history ------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--ssh-key", "/nonexistent/key.pub"], "cannot read SSH key file"),
        (["--ssh-key", "{bad_key}"], "not an OpenSSH public key"),
        (["--user-data", "{big}"], "at most 65536"),
        (["--hostname", "not_a_host!"], "RFC 1123"),
        (["--ssh-key", "{good_key}", "--no-ssh-keys"], "contradict"),
        (["--seed-format", "floppy"], "nocloud or config-drive"),
    ],
)
async def test_bad_identity_options_exit_2_before_anything_starts(
    dev_server: DevServer, unique_host: str, tmp_path: Path, args: list[str], message: str
) -> None:
    (tmp_path / "bad.pub").write_text("ssh-rsa !!!not base64\n")
    (tmp_path / "good.pub").write_text(KEY_A + "\n")
    (tmp_path / "big").write_text("x" * (65 << 10))
    files = {"bad_key": tmp_path / "bad.pub", "good_key": tmp_path / "good.pub", "big": tmp_path / "big"}
    args = [a.format(**files) for a in args]
    result = await rebuild_cli(
        dev_server.address,
        "start",
        "vm-1",
        "--host",
        unique_host,
        "--image",
        "http://images.example/b",
        *args,
    )
    assert result.code == 2, result.stdout + result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr


async def test_the_password_never_enters_the_history(
    dev_server: DevServer, client: Client, unique_host: str, tmp_path: Path, fake_host: FakeHost
) -> None:
    password = "pw-that-must-not-leak-4711"
    (tmp_path / "pw").write_text(password + "\n")
    started = await rebuild_cli(
        dev_server.address,
        *("start", "vm-pw", "--host", unique_host, "--image", "http://images.example/b"),
        *("--admin-password-file", str(tmp_path / "pw"), "--require-approval"),
    )
    assert started.code == 0, started.stderr
    handle = client.get_workflow_handle(rebuild_workflow_id(unique_host, "vm-pw"))
    history = await handle.fetch_history()
    # Every event as stored, payloads as raw bytes (the JSON form would base64 them).
    stored = b"".join(event.SerializeToString() for event in history.events)
    assert password.encode() not in stored
    assert b"$6$" in stored  # the hash is what travels
    await handle.terminate("test over")


# --- the payload codec: user data encrypted in the history, readable through the codec server ------


async def test_user_data_is_encrypted_in_the_history_and_the_codec_server_decodes_it(
    dev_server: DevServer, unique_host: str, tmp_path: Path
) -> None:
    key_file = tmp_path / "codec.key"
    key_file.write_text(os.urandom(32).hex())
    secret = "db_password=very-secret-4711"
    (tmp_path / "user-data").write_text(f"#!/bin/sh\necho {secret} > /etc/app.env\n")
    client = await Client.connect(dev_server.address, data_converter=data_converter(key_file))
    fake = FakeHost()
    async with (
        Worker(client, task_queue=WORKFLOW_TASK_QUEUE, workflows=[RebuildInstance]),
        Worker(client, task_queue=host_task_queue(unique_host), activities=fake.activities()),
    ):
        started = await rebuild_cli(
            dev_server.address,
            *("start", "vm-enc", "--host", unique_host, "--image", "http://images.example/b"),
            *("--user-data", str(tmp_path / "user-data"), "--require-approval"),
            env={KEY_ENV: str(key_file)},
        )
        assert started.code == 0, started.stderr
        handle = client.get_workflow_handle(rebuild_workflow_id(unique_host, "vm-enc"))
        # The workflow decoded its input (its query answers), yet the server stores only ciphertext.
        assert (await handle.query("status"))["phase"] in ("await-approval", "check", "fetch", "inspect")
        history = await handle.fetch_history()
        stored = b"".join(event.SerializeToString() for event in history.events)
        assert secret.encode() not in stored
        assert b"binary/encrypted" in stored
        encrypted = history.events[0].workflow_execution_started_event_attributes.input
        await handle.terminate("test over")

    clients = ApiClients.parse("ui a-token-long-enough-1")
    server = TestServer(build_app(EncryptionCodec(load_key(key_file)), "http://localhost:8233", clients))
    async with TestClient(server) as http:
        answer = await http.post(
            "/decode",
            data=json_format.MessageToJson(encrypted),
            headers={
                "Origin": "http://localhost:8233",
                "Content-Type": "application/json",
                "Authorization": "Bearer a-token-long-enough-1",
            },
        )
        assert answer.status == 200
        assert answer.headers["Access-Control-Allow-Origin"] == "http://localhost:8233"
        decoded = json_format.Parse(await answer.text(), Payloads())
        assert secret.encode() in decoded.payloads[0].data


async def test_a_bad_codec_key_is_bad_input(dev_server: DevServer, unique_host: str, tmp_path: Path) -> None:
    (tmp_path / "short.key").write_text("abcd")
    result = await rebuild_cli(
        dev_server.address,
        *("start", "vm-1", "--host", unique_host, "--image", "http://images.example/b"),
        env={KEY_ENV: str(tmp_path / "short.key")},
    )
    assert result.code == 2
    assert "must hold 64 hexadecimal digits" in result.stderr
