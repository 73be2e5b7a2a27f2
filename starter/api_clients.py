"""Who may call the HTTP API, and what each caller may do: one bearer token per client, with its scopes.

The name is what the API records as the requester of whatever the client starts or steers, so a caller
cannot claim to be another: the token says who it is, not the request body.

The tokens file has one client a line; blank lines and ``#`` comments are skipped::

    NAME TOKEN hosts=PATTERN,... instances=PATTERN,... verbs=VERB,...

``hosts`` and ``instances`` are ``fnmatch`` patterns (``hv-*``, ``web-?``, ``*``); ``verbs`` are
:data:`VERBS`. A scoped line must give all three: a client reaches only what its line names. A line of
two columns, ``NAME TOKEN`` (the format before scopes), still works and means every host, every instance
and every verb but ``self-approve``: the deployments that have one keep working after an upgrade, the one
thing they lose is approving their own rebuilds, and the API logs a warning naming each such client so
the operator scopes it.

Under systemd the file arrives through ``LoadCredential=`` (``$CREDENTIALS_DIRECTORY/api-tokens``), so it
can stay root-only on disk while the API runs as an unprivileged dynamic user. A file anyone else may read
is refused (:meth:`ApiClients.load`).
"""

from __future__ import annotations

import fnmatch
import hmac
import re
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

CLIENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")
SCOPE_PATTERN = re.compile(r"[A-Za-z0-9_.*?\[\]!-]{1,200}")
MIN_TOKEN_LENGTH = 16
# What a client may do. start: a rebuild; approve, confirm, revert, abort: steer one; fleet: start and
# steer fleets; snapshot: create, list, show, delete snapshots; self-approve: approve a rebuild it started
# itself (without it, an approval needs a second client: a two-person rule).
VERBS = ("start", "approve", "confirm", "revert", "abort", "fleet", "snapshot", "self-approve")
LEGACY_VERBS = frozenset(VERBS) - {"self-approve"}
SCOPE_KEYS = ("hosts", "instances", "verbs")


class TokensFileError(ValueError):
    """The tokens file cannot be used; the message names the file and the line."""


class Forbidden(Exception):
    """The client's token is good, but its scopes do not cover what it asked (HTTP 403)."""


@dataclass(frozen=True)
class ApiClient:
    """One caller: its name and what it may reach."""

    name: str
    hosts: tuple[str, ...] = ("*",)
    instances: tuple[str, ...] = ("*",)
    verbs: frozenset[str] = LEGACY_VERBS
    # A two-column line of the old format: full access but self-approval, with a warning at start.
    legacy: bool = False

    def may_reach_host(self, host: str) -> bool:
        return any(fnmatch.fnmatchcase(host, pattern) for pattern in self.hosts)

    def may_reach(self, host: str, instance: str) -> bool:
        return self.may_reach_host(host) and any(
            fnmatch.fnmatchcase(instance, pattern) for pattern in self.instances
        )

    def covers_pattern(self, pattern: str) -> bool:
        """Whether every instance a fleet's name pattern can match is in scope: only when the scope is
        ``*`` or names that very pattern (patterns are not compared for inclusion)."""
        return "*" in self.instances or pattern in self.instances

    def require(self, verb: str, host: str | None = None, instance: str | None = None) -> None:
        """Refuse (:class:`Forbidden`) unless the client may ``verb`` on that host and instance."""
        if verb not in self.verbs:
            raise Forbidden(f"client {self.name} may not {verb} (its verbs: {', '.join(sorted(self.verbs))})")
        if host is not None and not self.may_reach_host(host):
            raise Forbidden(f"client {self.name} may not touch host {host}")
        if host is not None and instance is not None and not self.may_reach(host, instance):
            raise Forbidden(f"client {self.name} may not touch instance {instance} on {host}")

    def require_hosts(self, verb: str, hosts: Iterable[str]) -> None:
        for host in hosts:
            self.require(verb, host)


def requester_client(requested_by: str) -> str:
    """The client that started a rebuild, from its ``requested_by`` ("ci" or "ci (for alice)")."""
    return requested_by.split(" (for ", 1)[0]


@dataclass(frozen=True)
class ApiClients:
    """Tokens to clients; :meth:`identify` compares in constant time."""

    by_token: dict[str, ApiClient]

    def __post_init__(self) -> None:
        if not self.by_token:
            raise TokensFileError("the API needs at least one client token")

    def identify(self, authorization: str) -> ApiClient | None:
        """The client for an ``Authorization`` header value, or None."""
        given = authorization.encode()
        found = None
        # Every token is compared, so the time taken says nothing about which one nearly matched.
        for token, client in self.by_token.items():
            if hmac.compare_digest(given, f"Bearer {token}".encode()):
                found = client
        return found

    def names(self) -> list[str]:
        return sorted(client.name for client in self.by_token.values())

    def legacy_names(self) -> list[str]:
        return sorted(client.name for client in self.by_token.values() if client.legacy)

    @classmethod
    def parse(cls, text: str, source: str = "tokens") -> ApiClients:
        by_token: dict[str, ApiClient] = {}
        names: set[str] = set()
        for number, raw in enumerate(text.splitlines(), start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            where = f"{source}:{number}"
            fields = line.split()
            if len(fields) < 2:
                raise TokensFileError(
                    f"{where}: expected 'NAME TOKEN' (and hosts=... instances=... verbs=...)"
                )
            name, token, *scopes = fields
            if not CLIENT_NAME.fullmatch(name):
                raise TokensFileError(f"{where}: not a usable client name: {name!r}")
            if len(token) < MIN_TOKEN_LENGTH:
                raise TokensFileError(
                    f"{where}: the token of {name} is shorter than {MIN_TOKEN_LENGTH} chars"
                )
            if name in names or token in by_token:
                raise TokensFileError(f"{where}: client {name} or its token appears twice")
            names.add(name)
            by_token[token] = _client(name, scopes, where) if scopes else ApiClient(name, legacy=True)
        return cls(by_token)

    @classmethod
    def load(cls, path: Path) -> ApiClients:
        """The file's clients; a file that others than its owner may read (0644) is refused: its tokens
        would be every local user's."""
        try:
            mode = path.stat().st_mode
            text = path.read_text()
        except OSError as err:
            raise TokensFileError(f"cannot read the tokens file {path}: {err.strerror}") from None
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise TokensFileError(
                f"the tokens file {path} is readable by others (mode {stat.S_IMODE(mode):04o}): "
                f"chmod 0600 it (or 0400), or pass it with systemd's LoadCredential="
            )
        return cls.parse(text, str(path))


def _client(name: str, scopes: list[str], where: str) -> ApiClient:
    given: dict[str, tuple[str, ...]] = {}
    for scope in scopes:
        key, sep, value = scope.partition("=")
        if not sep or key not in SCOPE_KEYS:
            raise TokensFileError(f"{where}: {scope!r} is not one of {'=, '.join(SCOPE_KEYS)}=")
        if key in given:
            raise TokensFileError(f"{where}: {key}= appears twice")
        items = tuple(item for item in value.split(",") if item)
        if not items:
            raise TokensFileError(f"{where}: {key}= is empty")
        given[key] = items
    missing = [key for key in SCOPE_KEYS if key not in given]
    if missing:
        raise TokensFileError(f"{where}: a scoped client needs {', '.join(k + '=' for k in missing)} too")
    for pattern in (*given["hosts"], *given["instances"]):
        if not SCOPE_PATTERN.fullmatch(pattern):
            raise TokensFileError(f"{where}: not a usable pattern: {pattern!r}")
    unknown = sorted(set(given["verbs"]) - set(VERBS))
    if unknown:
        raise TokensFileError(f"{where}: unknown verbs {', '.join(unknown)} (known: {', '.join(VERBS)})")
    return ApiClient(name, given["hosts"], given["instances"], frozenset(given["verbs"]))
