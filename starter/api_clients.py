"""Who may call the HTTP API: one bearer token per client, each with a name.

The name is what the API records as the requester of whatever the client starts or steers, so a caller
cannot claim to be another: the token says who it is, not the request body.

The tokens file has one client a line, ``NAME TOKEN``; blank lines and ``#`` comments are skipped.
Under systemd it arrives through ``LoadCredential=`` (``$CREDENTIALS_DIRECTORY/api-tokens``), so it can
stay root-only on disk while the API runs as an unprivileged dynamic user.
"""

from __future__ import annotations

import hmac
import re
from dataclasses import dataclass
from pathlib import Path

CLIENT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
MIN_TOKEN_LENGTH = 16


class TokensFileError(ValueError):
    """The tokens file cannot be used; the message names the file and the line."""


@dataclass(frozen=True)
class ApiClients:
    """Tokens to client names; :meth:`identify` compares in constant time."""

    by_token: dict[str, str]

    def __post_init__(self) -> None:
        if not self.by_token:
            raise TokensFileError("the API needs at least one client token")

    def identify(self, authorization: str) -> str | None:
        """The client's name for an ``Authorization`` header value, or None."""
        given = authorization.encode()
        found = None
        # Every token is compared, so the time taken says nothing about which one nearly matched.
        for token, name in self.by_token.items():
            if hmac.compare_digest(given, f"Bearer {token}".encode()):
                found = name
        return found

    @classmethod
    def parse(cls, text: str, source: str = "tokens") -> ApiClients:
        by_token: dict[str, str] = {}
        names: set[str] = set()
        for number, raw in enumerate(text.splitlines(), start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            fields = line.split()
            if len(fields) != 2:
                raise TokensFileError(f"{source}:{number}: expected 'NAME TOKEN'")
            name, token = fields
            if not CLIENT_NAME.match(name):
                raise TokensFileError(f"{source}:{number}: not a usable client name: {name!r}")
            if len(token) < MIN_TOKEN_LENGTH:
                raise TokensFileError(
                    f"{source}:{number}: the token of {name} is shorter than {MIN_TOKEN_LENGTH} characters"
                )
            if name in names or token in by_token:
                raise TokensFileError(f"{source}:{number}: client {name} or its token appears twice")
            names.add(name)
            by_token[token] = name
        return cls(by_token)

    @classmethod
    def load(cls, path: Path) -> ApiClients:
        try:
            text = path.read_text()
        except OSError as err:
            raise TokensFileError(f"cannot read the tokens file {path}: {err.strerror}") from None
        return cls.parse(text, str(path))
