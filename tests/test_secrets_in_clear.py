"""Issue 24, findings 9 and 11, from the side of a Temporal client without the codec key and of a
caller that writes markdown: what the server stores and the Web UI renders holds no secret in clear."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from temporalio.api.common.v1 import Payload
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client
from temporalio.worker import Worker

from common.codec import EncryptionCodec, PlaintextRefused, data_converter, load_key
from devtools.temporal_dev import DevServer
from devtools.testbed.fake_host import FakeHost
from starter.rebuilds import start_rebuild
from workflows.models import (
    WORKFLOW_TASK_QUEUE,
    AbortRequest,
    Decision,
    RebuildRequest,
    StrictRebuildRequest,
    host_task_queue,
)
from workflows.rebuild import RebuildInstance
from workflows.ui_text import escape_markdown, shown_url

SIGNED = "https://images.example/b.qcow2?X-Amz-Credential=AKIA0042&X-Amz-Signature=s1gn4tur3"


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "codec.key"
    path.write_text(os.urandom(32).hex())
    return path


@pytest.fixture
async def keyed(dev_server: DevServer, unique_host: str, key_file: Path) -> AsyncIterator[Client]:
    """A client and workers that hold the key, as a deployment with the codec runs them."""
    client = await Client.connect(dev_server.address, data_converter=data_converter(key_file))
    async with (
        Worker(client, task_queue=WORKFLOW_TASK_QUEUE, workflows=[RebuildInstance]),
        Worker(client, task_queue=host_task_queue(unique_host), activities=FakeHost().activities()),
    ):
        yield client


async def stored(client: Client, workflow_id: str) -> bytes:
    history = await client.get_workflow_handle(workflow_id).fetch_history()
    return b"".join(event.SerializeToString() for event in history.events)


async def test_a_signed_urls_credential_is_in_no_search_attribute_nor_web_ui_text(
    keyed: Client, unique_host: str
) -> None:
    request = RebuildRequest(instance="vm-1", host=unique_host, image_url=SIGNED, require_approval=True)
    handle = await start_rebuild(keyed, request)
    described = await handle.describe()
    image_id = {p.key.name: p.value for p in described.typed_search_attributes}["ImageId"]
    assert image_id.startswith("https://images.example/b.qcow2?(redacted sha256:")
    assert "s1gn4tur3" not in image_id and "AKIA0042" not in image_id
    assert "s1gn4tur3" not in (await described.static_details() or "")
    # The server keeps search attributes in clear: the whole history holds the credential nowhere.
    assert b"s1gn4tur3" not in await stored(keyed, handle.id)
    await handle.terminate("test over")


async def test_a_failure_message_is_encrypted_in_the_history(keyed: Client, unique_host: str) -> None:
    request = RebuildRequest(instance="vm-2", host=unique_host, image_url="http://images.example/b",
                             require_approval=True)  # fmt: skip
    handle = await start_rebuild(keyed, request)
    for _ in range(100):
        if (await handle.query("status"))["phase"] == "await-approval":
            break
        await asyncio.sleep(0.05)
    await handle.signal("abort", AbortRequest(reason="see /srv/secret-path/console.log"))
    with pytest.raises(Exception):  # noqa: B017 - the workflow fails; what it stored is the point
        await handle.result()
    history = await stored(keyed, handle.id)
    assert b"Encoded failure" in history
    assert b"secret-path" not in history


async def test_a_keyed_worker_refuses_a_plaintext_signal_from_a_keyless_client(
    dev_server: DevServer, keyed: Client, unique_host: str
) -> None:
    request = RebuildRequest(instance="vm-3", host=unique_host, image_url="http://images.example/b",
                             require_approval=True)  # fmt: skip
    handle = await start_rebuild(keyed, request)
    for _ in range(100):
        if (await handle.query("status"))["phase"] == "await-approval":
            break
        await asyncio.sleep(0.05)
    keyless = await Client.connect(dev_server.address)
    await keyless.get_workflow_handle(handle.id).signal("approve", Decision(requested_by="mallory"))
    for _ in range(100):
        events = [e.event_type async for e in keyless.get_workflow_handle(handle.id).fetch_history_events()]
        if EventType.EVENT_TYPE_WORKFLOW_TASK_FAILED in events:
            break
        await asyncio.sleep(0.05)
    assert EventType.EVENT_TYPE_WORKFLOW_TASK_FAILED in events
    # The forged approval never reached the workflow: nothing was stopped.
    assert EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED not in events[events.index(
        EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED):]  # fmt: skip
    await handle.terminate("test over")


async def test_the_codec_decodes_only_its_own_ciphertext_and_nulls(key_file: Path) -> None:
    codec = EncryptionCodec(load_key(key_file))
    (sealed,) = await codec.encode([Payload(metadata={"encoding": b"json/plain"}, data=b'"x"')])
    assert (await codec.decode([sealed]))[0].data == b'"x"'
    null = Payload(metadata={"encoding": b"binary/null"})
    assert await codec.decode([null]) == [null]
    with pytest.raises(PlaintextRefused, match="refused a plaintext payload"):
        await codec.decode([Payload(metadata={"encoding": b"json/plain"}, data=b'{"requested_by": "x"}')])


def test_shown_urls_keep_host_and_path_and_digest_the_rest() -> None:
    assert shown_url("https://images.example/b.qcow2") == "https://images.example/b.qcow2"
    one, two = shown_url(SIGNED), shown_url(SIGNED.replace("s1gn", "f0rg"))
    assert one == shown_url(SIGNED) and one != two
    assert "user:pw" not in shown_url("https://user:pw@images.example/b")


@pytest.mark.parametrize(
    "requested_by",
    ["![x](https://evil.example/leak.png)", "<img src=x>", "alice\n**boss**", "[link](http://x)", "`code`"],
)
def test_requested_by_with_markdown_or_html_is_refused_at_the_edge(requested_by: str) -> None:
    with pytest.raises(ValueError, match="requested_by may hold"):
        StrictRebuildRequest(instance="vm-1", host="hv-1", image_url="http://i/b", requested_by=requested_by)


def test_markdown_is_shown_as_its_characters() -> None:
    assert escape_markdown("![x](https://evil.example/leak.png)") == r"\!\[x\](https://evil.example/leak.png)"
    assert escape_markdown("<img src=x>") == r"\<img src=x\>"


async def test_the_service_layer_refuses_markdown_in_requested_by_too(
    keyed: Client, unique_host: str
) -> None:
    # The CLI and the API both start through start_rebuild: neither lets such a name into the Web UI.
    request = RebuildRequest(instance="vm-4", host=unique_host, image_url="http://images.example/b",
                             requested_by="![x](https://evil.example/leak.png)")  # fmt: skip
    with pytest.raises(ValueError, match="requested_by may hold"):
        await start_rebuild(keyed, request)
