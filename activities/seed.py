"""The seed activities: the guest's identity as a cloud-init seed, attached, undone, cleaned up.

The seed is a read-only CD-ROM beside the root disk, marked with the user alias ``ua-rebuild-seed`` so a
later rebuild finds and replaces it. The identity's public part lives in the domain's ``<metadata>``,
its secrets (user data, the password hash) in a root-only file of the state directory that the
metadata names by digest (``IdentityStore``); seed and metadata change in one ``define``, so a crash
leaves the old pair or the new one. What the instance had before is written beside the disk first, and the
undo puts exactly that back; cleanup removes the old seed file once the rebuild is kept.
"""

from __future__ import annotations

import asyncio
import xml.etree.ElementTree as ET
from pathlib import Path

from pydantic import BaseModel
from temporalio import activity

from activities import domain_xml as dx
from activities import libvirt_domain as ld
from activities.errors import InvalidRequest
from activities.identity_store import IdentityStore
from activities.seed_image import build_seed
from activities.state import StateDir, seed_path, seed_undo_path, write_atomically
from workflows.identity import GuestIdentity, identity_problems
from workflows.models import PrepareSeedInput, RemoveSeedBackupInput, RestoreSeedInput, SeedResult


class _Before(BaseModel):
    """The instance's seed and identity before this rebuild touched them."""

    seed_path: str | None = None
    identity: GuestIdentity | None = None


class SeedActivities:
    def __init__(self, libvirt_conn: ld.Libvirt, state: StateDir | None = None) -> None:
        self.libvirt = libvirt_conn
        self.state = state
        self.identities = IdentityStore(state)

    async def _definition(self, instance: str, target: str | None) -> tuple[ET.Element, str]:
        """The definition, and where the seed's files go: beside a file root disk; for other kinds
        in the worker's state directory, under the instance's UUID (QEMU's user can reach both)."""
        xml = await asyncio.to_thread(self.libvirt.domain(instance).definition)
        disk = dx.step_root_disk(xml, instance, target)
        if disk.kind == "file" or self.state is None:
            return xml, disk.path
        seeds = self.state.root / "seeds"
        seeds.mkdir(mode=0o711, exist_ok=True)
        return xml, str(seeds / str(xml.findtext("uuid")))

    @activity.defn
    async def prepare_seed(self, request: PrepareSeedInput) -> SeedResult:
        """Build the new seed from the instance's identity and the request's change, and attach it."""
        if request.change is not None and (problems := identity_problems(request.change)):
            raise InvalidRequest("; ".join(problems))
        xml, home = await self._definition(request.instance, request.root_disk_target)
        undo = seed_undo_path(home, request.rebuild_id)
        if undo.exists():
            # A retry: the definition may already hold the new seed; what came before is recorded.
            before = _Before.model_validate_json(undo.read_text())
        else:
            before = _Before(seed_path=dx.seed_file(xml), identity=self.identities.load(xml))
            write_atomically(undo, before.model_dump_json(), mode=0o600)
        identity = before.identity or GuestIdentity()
        if request.change is not None:
            identity = request.change.applied_to(identity)
        seed = seed_path(home, request.rebuild_id)
        instance_id = f"{xml.findtext('uuid')}-{request.rebuild_id}"
        await asyncio.to_thread(build_seed, identity, instance_id, seed)
        _, secrets = self.identities.save(xml, identity)
        definition = dx.with_seed(xml, request.instance, str(seed), identity, secrets)
        await asyncio.to_thread(self.libvirt.domain(request.instance).define, definition)
        return SeedResult(
            seed_path=str(seed),
            instance_id=instance_id,
            seed_format=identity.seed_format,
            summary=describe_identity(identity),
        )

    @activity.defn
    async def restore_seed(self, request: RestoreSeedInput) -> None:
        """Put the old seed and identity back. Nothing recorded: nothing of ours to undo."""
        xml, home = await self._definition(request.instance, request.root_disk_target)
        undo = seed_undo_path(home, request.rebuild_id)
        if not undo.exists():
            return
        before = _Before.model_validate_json(undo.read_text())
        new_secrets = dx.identity_secrets_digest(xml)
        secrets = self.identities.save(xml, before.identity)[1] if before.identity is not None else None
        definition = dx.with_seed(xml, request.instance, before.seed_path, before.identity, secrets)
        await asyncio.to_thread(self.libvirt.domain(request.instance).define, definition)
        if new_secrets is not None and new_secrets != secrets:
            self.identities.remove(xml, new_secrets)
        new = seed_path(home, request.rebuild_id)
        if str(new) != before.seed_path:
            new.unlink(missing_ok=True)
        undo.unlink()

    @activity.defn
    async def remove_seed_backup(self, request: RemoveSeedBackupInput) -> None:
        """The rebuild is kept: the old seed file goes (only one this project made, beside the disk)."""
        xml, home = await self._definition(request.instance, request.root_disk_target)
        undo = seed_undo_path(home, request.rebuild_id)
        if not undo.exists():
            return
        before = _Before.model_validate_json(undo.read_text())
        # The secrets of the identity before the rebuild go too, unless the new one has the same.
        self.identities.forget(xml, before.identity, keep=dx.identity_secrets_digest(xml))
        new = seed_path(home, request.rebuild_id)
        old = Path(before.seed_path) if before.seed_path else None
        if (
            old is not None
            and old != new
            and old.parent == new.parent
            and old.name.startswith(f"{Path(home).name}.seed-")
        ):
            old.unlink(missing_ok=True)
        undo.unlink()


def describe_identity(identity: GuestIdentity) -> str:
    """For status and the Web UI: what the guest gets, with nothing secret in it."""
    parts = [f"seed {identity.seed_format}"]
    if identity.hostname:
        parts.append(f"hostname {identity.hostname}")
    if identity.ssh_keys:
        parts.append(f"{len(identity.ssh_keys)} SSH key(s)")
    if identity.user_data:
        parts.append(f"user data {len(identity.user_data.encode())} bytes")
    if identity.admin_password_hash:
        parts.append("admin password set (hashed)")
    if identity.metadata:
        parts.append(f"{len(identity.metadata)} metadata item(s)")
    return ", ".join(parts)
