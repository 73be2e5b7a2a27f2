"""Issue 24, finding 6: every validator matches the whole value, so a trailing newline is refused.

Python's ``re.match(r"^...$")`` accepts ``"web-1\\n"``: ``$`` matches before a final newline. A hostname
``web-1\\n.evil\\n`` passed every label's check and reached the guest's seed. Each check below stands
where a caller stands: the edge models, the identity checks the seed activity makes again, and an
activity scheduled by name from the attacker's own workflow.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from starter.fleets import parse_duration
from tests.test_hostile_inputs import attack  # noqa: F401 - the fixture
from workflows.identity import IdentityChange, identity_problems, valid_hostname
from workflows.models import StrictRebuildRequest, check_host_name, check_instance_name

_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB0n4Kbh3u1rTzZYVZk5mBqHgmVj0yQn3c8o5y5p9Yb7 ops@example"
_HASH = "$6$saltsalt$" + "a" * 86
_IMAGE = "http://images.example/a.img"


@pytest.mark.parametrize("hostname", ["web-1\n", "web-1\n.evil\n", "web-1.example.org\n"])
def test_a_hostname_with_a_newline_is_refused(hostname: str) -> None:
    assert valid_hostname(hostname.replace("\n", ""))
    assert not valid_hostname(hostname)
    assert identity_problems(IdentityChange(hostname=hostname))


def test_an_ssh_key_and_a_password_hash_with_a_trailing_newline_are_refused() -> None:
    assert not identity_problems(IdentityChange(ssh_keys=(_KEY,), admin_password_hash=_HASH))
    assert (
        len(identity_problems(IdentityChange(ssh_keys=(_KEY + "\n",), admin_password_hash=_HASH + "\n"))) == 2
    )


@pytest.mark.parametrize(
    "field",
    [
        {"instance": "vm-1\n"},
        {"host": "h1\n"},
        {"sha256": "ab" * 32 + "\n"},
        {"sha512": "ab" * 64 + "\n"},
        {"root_disk": "vda\n"},
    ],
)
def test_the_edge_refuses_a_trailing_newline_in_every_checked_field(field: dict[str, str]) -> None:
    request: dict[str, Any] = {"instance": "vm-1", "host": "h1", "image_url": _IMAGE}
    StrictRebuildRequest(**request)
    with pytest.raises(ValidationError):
        StrictRebuildRequest(**(request | field))


def test_a_glance_image_id_with_a_trailing_newline_is_refused() -> None:
    glance = {"instance": "vm-1", "host": "h1", "glance_url": "http://glance.example"}
    StrictRebuildRequest(**glance, glance_image_id="0" * 32)
    with pytest.raises(ValidationError, match="not a Glance image ID"):
        StrictRebuildRequest(**glance, glance_image_id="0" * 32 + "\n")


def test_names_are_matched_whole() -> None:
    with pytest.raises(ValueError):
        check_instance_name("vm-1\n")
    with pytest.raises(ValueError):
        check_host_name("h1\n")
    assert parse_duration("5s") == 5.0


async def test_the_seed_activity_refuses_a_hostname_with_newlines(attack: Any, tmp_path: Path) -> None:  # noqa: F811
    answer = await attack(
        "prepare_seed",
        {"instance": "vm-1", "rebuild_id": "rebuild-attack-1", "change": {"hostname": "web-1\n.evil\n"}},
    )
    assert answer.startswith("InvalidRequest: hostname 'web-1\\n.evil\\n' is not an RFC 1123 host name")
    assert not list(tmp_path.rglob("*seed*"))


async def test_an_activity_refuses_a_disk_target_with_a_newline(attack: Any) -> None:  # noqa: F811
    answer = await attack("inspect_instance", {"instance": "vm-1", "root_disk": "vda\n"})
    assert answer.startswith("InvalidRequest: not a disk target")
