"""Where an instance's identity is kept on its host: the public part in the domain, the secrets not.

The domain's ``<metadata>`` is readable by any local user through libvirt's read-only socket
(``virsh -r dumpxml``), so it holds only what is not secret (hostname, keys, metadata items, the seed
format), a digest of the user data, and the digest that names the secret part's file. The secret part
(user data, the password hash) lives in the worker's state directory, root only: ``secrets/`` is 0700,
each file 0600, named by the domain's UUID and the digest of its content, so the identity before a
rebuild and after it are two files (a rollback re-points the domain, nothing is overwritten).
"""

from __future__ import annotations

import hashlib
import os
import re
import xml.etree.ElementTree as ET
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from activities import domain_xml as dx
from activities.errors import InvalidRequest, UnsupportedInstance
from activities.state import StateDir, write_atomically
from workflows.identity import GuestIdentity

_UUID = re.compile(r"[0-9a-fA-F-]{36}")
_SHA256 = re.compile(r"[0-9a-f]{64}")


class IdentitySecrets(BaseModel):
    model_config = ConfigDict(frozen=True)

    user_data: str | None = None
    admin_password_hash: str | None = None


def split(identity: GuestIdentity) -> tuple[GuestIdentity, IdentitySecrets | None]:
    """The identity without its secrets, and the secrets (None when it has none)."""
    secrets = IdentitySecrets(user_data=identity.user_data, admin_password_hash=identity.admin_password_hash)
    public = identity.model_copy(update={"user_data": None, "admin_password_hash": None})
    return public, secrets if secrets.user_data or secrets.admin_password_hash else None


def digest_of(secrets: IdentitySecrets) -> str:
    return hashlib.sha256(secrets.model_dump_json().encode()).hexdigest()


class IdentityStore:
    def __init__(self, state: StateDir | None) -> None:
        self.state = state

    def _path(self, uuid: str, digest: str) -> Path:
        if self.state is None:
            raise UnsupportedInstance("this worker has no state directory to keep an identity's secrets in")
        if not _UUID.fullmatch(uuid) or not _SHA256.fullmatch(digest):
            raise InvalidRequest(f"not a domain UUID and a SHA-256 digest: {uuid[:40]!r}, {digest[:70]!r}")
        return StateDir._inside(self.state.root / "secrets", f"{uuid.lower()}.{digest}.json")

    def save(self, xml: ET.Element, identity: GuestIdentity) -> tuple[GuestIdentity, str | None]:
        """Write the secret part root-only; the public part and the digest that names the secrets."""
        public, secrets = split(identity)
        if secrets is None:
            return public, None
        digest = digest_of(secrets)
        path = self._path(str(xml.findtext("uuid")), digest)
        path.parent.mkdir(mode=0o700, exist_ok=True)
        os.chmod(path.parent, 0o700)
        if not path.exists():
            write_atomically(path, secrets.model_dump_json(), mode=0o600)
        return public, digest

    def load(self, xml: ET.Element) -> GuestIdentity | None:
        """The whole identity: the domain's public part with the secrets its digest names.

        An identity recorded by an older release (secrets inline in the metadata) is read as it is; the
        next rebuild moves its secrets out.
        """
        public = dx.current_identity(xml)
        digest = dx.identity_secrets_digest(xml)
        if public is None or digest is None:
            return public
        path = self._path(str(xml.findtext("uuid")), digest)
        try:
            secrets = IdentitySecrets.model_validate_json(path.read_text())
        except FileNotFoundError:
            raise UnsupportedInstance(
                f"the secret part of the instance's identity (user data, password hash) is missing: {path}; "
                "give them again (--user-data, --admin-pass) or restore the file"
            ) from None
        if digest_of(secrets) != digest:
            raise UnsupportedInstance(f"the secret part of the instance's identity in {path} was changed")
        return public.model_copy(
            update={"user_data": secrets.user_data, "admin_password_hash": secrets.admin_password_hash}
        )

    def forget(self, xml: ET.Element, identity: GuestIdentity | None, keep: str | None) -> None:
        """Remove the secrets file of ``identity`` unless it is the one named ``keep``."""
        if identity is None or (secrets := split(identity)[1]) is None:
            return
        digest = digest_of(secrets)
        if digest != keep:
            self.remove(xml, digest)

    def remove(self, xml: ET.Element, digest: str) -> None:
        self._path(str(xml.findtext("uuid")), digest).unlink(missing_ok=True)
