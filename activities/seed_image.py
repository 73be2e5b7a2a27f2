"""The cloud-init seed a rebuilt guest boots with: a small ISO 9660 image, built in Python.

Two layouts, both read by cloud-init out of the box:
- NoCloud (the default): volume label ``cidata`` with ``meta-data``, ``user-data`` (and
  ``network-config`` where asked). Every cloud-init image reads it, with no network and no metadata
  service, and it needs nothing but the files.
- OpenStack config drive: volume label ``config-2`` with ``openstack/latest/meta_data.json`` and
  ``user_data``, so images built for Nova (and cloudbase-init on Windows) work unchanged.

A password reaches the guest only as a SHA-512 crypt hash inside a cloud-config part; the operator's own
user data, if any, follows as a second part of a MIME multipart document, as cloud-init merges them.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from pathlib import Path

import pycdlib

from workflows.identity import GuestIdentity

NOCLOUD_LABEL = "cidata"
CONFIG_DRIVE_LABEL = "config-2"


def build_seed(identity: GuestIdentity, instance_id: str, path: Path) -> None:
    """Write the seed ISO for ``identity`` to ``path`` (replacing what is there)."""
    if identity.seed_format == "config-drive":
        label, files = CONFIG_DRIVE_LABEL, _config_drive_files(identity, instance_id)
    else:
        label, files = NOCLOUD_LABEL, _nocloud_files(identity, instance_id)
    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=4, joliet=3, rock_ridge="1.09", vol_ident=label)
    made: set[str] = set()
    for name, data in files.items():
        parts = name.split("/")
        for depth in range(1, len(parts)):
            directory = "/".join(parts[:depth])
            if directory not in made:
                iso.add_directory(_iso_name(directory), rr_name=parts[depth - 1], joliet_path=f"/{directory}")
                made.add(directory)
        iso.add_fp(
            io.BytesIO(data), len(data), _iso_name(name) + ";1", rr_name=parts[-1], joliet_path=f"/{name}"
        )
    temporary = path.with_name(f".{path.name}.tmp")
    # 0600 whatever the umask, from its first byte: the seed holds the user data and the password
    # hash. QEMU's user reads it all the same: libvirt's DAC driver hands a guest's disks to it.
    temporary.unlink(missing_ok=True)
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        os.fchmod(out.fileno(), 0o600)
        iso.write_fp(out)
    iso.close()
    temporary.replace(path)


def read_seed(path: Path) -> tuple[str, dict[str, bytes]]:
    """The volume label and every file of a seed ISO (for tests, and for operators who look)."""
    iso = pycdlib.PyCdlib()
    iso.open(str(path))
    try:
        label = iso.pvd.volume_identifier.decode().strip()
        files: dict[str, bytes] = {}
        for root, _dirs, names in iso.walk(rr_path="/"):
            for name in names:
                rr_path = f"{root.rstrip('/')}/{name}"
                out = io.BytesIO()
                iso.get_file_from_iso_fp(out, rr_path=rr_path)
                files[rr_path.lstrip("/")] = out.getvalue()
        return label, files
    finally:
        iso.close()


def _iso_name(name: str) -> str:
    """An ISO 9660 level-4 name for a path: upper case, with ``-`` and ``.`` kept where allowed."""
    return "/" + "/".join(part.upper().replace("-", "_") for part in name.split("/"))


def _nocloud_files(identity: GuestIdentity, instance_id: str) -> dict[str, bytes]:
    meta = [f"instance-id: {json.dumps(instance_id)}"]
    if identity.hostname:
        meta.append(f"local-hostname: {json.dumps(identity.hostname)}")
    if identity.ssh_keys:
        meta.append("public-keys:")
        meta.extend(f"  - {json.dumps(key)}" for key in identity.ssh_keys)
    return {"meta-data": ("\n".join(meta) + "\n").encode(), "user-data": user_data(identity)}


def _config_drive_files(identity: GuestIdentity, instance_id: str) -> dict[str, bytes]:
    meta: dict[str, object] = {"uuid": instance_id, "meta": identity.metadata}
    if identity.hostname:
        meta["hostname"] = identity.hostname
    if identity.name:
        meta["name"] = identity.name
    if identity.ssh_keys:
        meta["public_keys"] = {f"key-{n}": key for n, key in enumerate(identity.ssh_keys)}
    return {
        "openstack/latest/meta_data.json": json.dumps(meta, sort_keys=True).encode(),
        "openstack/latest/user_data": user_data(identity),
    }


def user_data(identity: GuestIdentity) -> bytes:
    """The operator's user data, with our own cloud-config part first where we have one."""
    ours = _our_cloud_config(identity)
    if ours is None:
        return (identity.user_data or "").encode()
    if not identity.user_data:
        return ours.encode()
    # A boundary from the content: the same identity always gives the same seed bytes.
    digest = hashlib.sha256(f"{ours}\0{identity.user_data}".encode()).hexdigest()[:24]
    document = MIMEMultipart(boundary=f"==durable-rebuild-{digest}==")
    document.attach(MIMEText(ours, "cloud-config"))
    subtype = "cloud-config" if identity.user_data.startswith("#cloud-config") else "x-shellscript"
    if identity.user_data.startswith("#!"):
        subtype = "x-shellscript"
    document.attach(MIMEText(identity.user_data, subtype))
    return document.as_bytes()


def _our_cloud_config(identity: GuestIdentity) -> str | None:
    lines = ["#cloud-config"]
    if identity.hostname:
        # NoCloud's local-hostname suffices for cloud-init, the config drive's hostname too; said
        # again here so that /etc/hosts follows.
        lines.append("manage_etc_hosts: true")
    if identity.admin_password_hash:
        lines += [
            "ssh_pwauth: false",
            "chpasswd:",
            "  expire: false",
            "  users:",
            f"    - {{name: root, password: {json.dumps(identity.admin_password_hash)}, type: hash}}",
        ]
    return "\n".join(lines) + "\n" if len(lines) > 1 else None
