"""`rebuild start`'s identity options (Nova's rebuild options) turned into an IdentityChange.

Files are read here, on the operator's machine; the password is hashed here (SHA-512 crypt) and never
leaves this process in clear. Nova's semantics: an option not given keeps the instance's value, an
explicit ``--no-...`` removes it.
"""

from __future__ import annotations

from pathlib import Path

from passlib.hash import sha512_crypt

from workflows.identity import IdentityChange, SeedFormat, identity_problems


class IdentityOptionError(ValueError):
    """An identity option that cannot be used; said before anything starts."""


def _read(path: Path, what: str) -> str:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise IdentityOptionError(
            f"cannot read {what} {path}: {getattr(err, 'strerror', None) or err}"
        ) from None


def hash_password(password: str) -> str:
    return str(sha512_crypt.hash(password))


def identity_change(
    *,
    ssh_key_files: list[Path] | None,
    no_ssh_keys: bool,
    user_data_file: Path | None,
    no_user_data: bool,
    hostname: str | None,
    name: str | None,
    description: str | None,
    metadata: list[str] | None,
    no_metadata: bool,
    admin_password_file: Path | None,
    seed_format: SeedFormat | None,
) -> IdentityChange | None:
    """The change the options ask for; None when they ask for none."""
    if ssh_key_files and no_ssh_keys:
        raise IdentityOptionError("--ssh-key and --no-ssh-keys contradict each other")
    if user_data_file and no_user_data:
        raise IdentityOptionError("--user-data and --no-user-data contradict each other")
    if metadata and no_metadata:
        raise IdentityOptionError("--metadata and --no-metadata contradict each other")
    keys: tuple[str, ...] | None = None
    if no_ssh_keys:
        keys = ()
    elif ssh_key_files:
        keys = tuple(
            line.strip()
            for path in ssh_key_files
            for line in _read(path, "SSH key file").splitlines()
            if line.strip() and not line.startswith("#")
        )
        if not keys:
            raise IdentityOptionError("the --ssh-key files hold no key")
    user_data = "" if no_user_data else (_read(user_data_file, "user data file") if user_data_file else None)
    items: dict[str, str] | None = {} if no_metadata else None
    for item in metadata or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise IdentityOptionError(f"--metadata must be KEY=VALUE, not {item!r}")
        items = {**(items or {}), key: value}
    password_hash = None
    if admin_password_file is not None:
        password = _read(admin_password_file, "password file").rstrip("\n")
        password_hash = hash_password(password) if password else ""
    change = IdentityChange(
        hostname=hostname,
        name=name,
        description=description,
        ssh_keys=keys,
        user_data=user_data,
        metadata=items,
        admin_password_hash=password_hash,
        seed_format=seed_format,
    )
    if change == IdentityChange():
        return None
    if problems := identity_problems(change):
        raise IdentityOptionError("; ".join(problems))
    return change
