"""The guest's identity across rebuilds: what cloud-init gets, and Nova's rules for changing it.

Nova's rebuild takes ``key_name``, ``user_data``, ``hostname``, ``name``, ``description``, ``metadata``
and ``adminPass``; an option not given keeps the instance's current value, an explicit empty one
removes it. The instance's current values live with the instance (its libvirt ``<metadata>``), so the
next rebuild, started from any machine, knows them.

Plain models and pure functions only: the workflow imports this module.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

SeedFormat = Literal["nocloud", "config-drive"]
# Nova's limits: user data of at most 64 KiB, metadata keys and values of at most 255 characters.
MAX_USER_DATA_BYTES = 64 << 10
MAX_METADATA_ITEMS = 128
MAX_FIELD = 255
MAX_SSH_KEYS = 32
MAX_SSH_KEY = 16 << 10
_HOST_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")
_SSH_KEY = re.compile(
    r"^(ssh-(ed25519|rsa|dss)|ecdsa-sha2-nistp(256|384|521)|sk-(ssh-ed25519|ecdsa-sha2-nistp256)@openssh\.com)"
    r" [A-Za-z0-9+/]+={0,3}( [^\r\n]*)?$"
)
# SHA-512 crypt, as crypt(3) and cloud-init's chpasswd take it: $6$[rounds=N$]salt$hash.
_SHA512_CRYPT = re.compile(r"^\$6\$(rounds=[0-9]{1,9}\$)?[./A-Za-z0-9]{1,16}\$[./A-Za-z0-9]{86}$")


class GuestIdentity(BaseModel):
    """What an instance's guest is told at boot. Recorded with the instance; never a password."""

    model_config = ConfigDict(frozen=True)

    hostname: str | None = None
    name: str | None = None
    description: str | None = None
    ssh_keys: tuple[str, ...] = ()
    user_data: str | None = None
    metadata: dict[str, str] = Field(default_factory=dict)
    admin_password_hash: str | None = None
    seed_format: SeedFormat = "nocloud"


class IdentityChange(BaseModel):
    """What a rebuild request says about the identity: None keeps, empty removes, a value replaces."""

    model_config = ConfigDict(frozen=True)

    hostname: str | None = None
    name: str | None = None
    description: str | None = None
    ssh_keys: tuple[str, ...] | None = None
    user_data: str | None = None
    metadata: dict[str, str] | None = None
    # Hashed by the caller (SHA-512 crypt) before it enters a workflow: the password never does.
    admin_password_hash: str | None = None
    seed_format: SeedFormat | None = None

    def applied_to(self, current: GuestIdentity) -> GuestIdentity:
        """The identity after this change, by Nova's rules."""

        def pick(new: str | None, old: str | None) -> str | None:
            if new is None:
                return old
            return new or None

        return GuestIdentity(
            hostname=pick(self.hostname, current.hostname),
            name=pick(self.name, current.name),
            description=pick(self.description, current.description),
            ssh_keys=current.ssh_keys if self.ssh_keys is None else self.ssh_keys,
            user_data=pick(self.user_data, current.user_data),
            metadata=current.metadata if self.metadata is None else self.metadata,
            admin_password_hash=pick(self.admin_password_hash, current.admin_password_hash),
            seed_format=self.seed_format or current.seed_format,
        )


def identity_problems(change: IdentityChange) -> list[str]:
    """Everything wrong with a change, in words an operator can act on; empty when it is fine.

    Checked at the edges (CLI, API) and again by the activity that builds the seed, since anyone who
    reaches Temporal can call it.
    """
    problems = []
    if change.hostname and not valid_hostname(change.hostname):
        problems.append(f"hostname {change.hostname[:80]!r} is not an RFC 1123 host name")
    for what, value in (("name", change.name), ("description", change.description)):
        if value is not None and len(value) > MAX_FIELD:
            problems.append(f"{what} has {len(value)} characters, at most {MAX_FIELD}")
    if change.user_data is not None and len(change.user_data.encode()) > MAX_USER_DATA_BYTES:
        problems.append(f"user data is {len(change.user_data.encode())} bytes, at most {MAX_USER_DATA_BYTES}")
    if change.ssh_keys is not None:
        if len(change.ssh_keys) > MAX_SSH_KEYS:
            problems.append(f"{len(change.ssh_keys)} SSH keys, at most {MAX_SSH_KEYS}")
        for key in change.ssh_keys:
            if len(key) > MAX_SSH_KEY or not _SSH_KEY.fullmatch(key):
                problems.append(f"not an OpenSSH public key: {key[:40]!r}...")
    if change.metadata is not None:
        if len(change.metadata) > MAX_METADATA_ITEMS:
            problems.append(f"{len(change.metadata)} metadata items, at most {MAX_METADATA_ITEMS}")
        for key, value in change.metadata.items():
            if not 1 <= len(key) <= MAX_FIELD or len(value) > MAX_FIELD:
                problems.append(
                    f"metadata {key[:40]!r}: keys 1 to {MAX_FIELD} characters, values at most {MAX_FIELD}"
                )
    if change.admin_password_hash and not _SHA512_CRYPT.fullmatch(change.admin_password_hash):
        problems.append("the admin password must arrive as a SHA-512 crypt hash ($6$...), never in clear")
    return problems


def valid_hostname(name: str) -> bool:
    return len(name) <= 253 and all(_HOST_LABEL.fullmatch(label) for label in name.rstrip(".").split("."))
