"""Text that leaves the codec's protection: search attributes (never encoded) and the Web UI's summary
and details (markdown, rendered in an operator's browser). Pure functions, safe in the sandbox.

A signed image URL carries its credential in the query string (``X-Amz-Signature=``, ``temp_url_sig=``)
and sometimes in its user info; what is shown keeps the scheme, host and path, and replaces the rest
with a digest, so two rebuilds of one URL still show the same text. Markdown from a caller (a
``requested_by`` of ``![x](https://evil/?leak)``) is shown as the characters it is, never rendered.
"""

from __future__ import annotations

import hashlib
import re
from urllib.parse import urlsplit, urlunsplit

# Enough to make no link, image, HTML, code or emphasis: names keep their dots and dashes readable.
_MARKDOWN = re.compile(r"([\\`*_\[\]<>!|~])")


def shown_url(url: str) -> str:
    """``url`` without user info, query or fragment; a digest of what was taken out stands for it."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return f"(unparsable URL, sha256:{_digest(url)})"
    if not (parts.query or parts.fragment or "@" in parts.netloc):
        return url
    host = parts.netloc.rsplit("@", 1)[-1]
    hidden = _digest(f"{parts.netloc}?{parts.query}#{parts.fragment}")
    return urlunsplit((parts.scheme, host, parts.path, "", "")) + f"?(redacted sha256:{hidden})"


def shown_image(label: str) -> str:
    """An image label (URL, ``glance:ID``, ``snapshot:ID``) as it may be shown outside the codec."""
    return shown_url(label) if "://" in label else label


def escape_markdown(text: str, keep_paragraphs: bool = False) -> str:
    """``text`` as literal characters in the Web UI's markdown (no links, images, emphasis, HTML);
    line breaks become spaces unless ``keep_paragraphs`` (the caller's own blank-line layout)."""
    if not keep_paragraphs:
        text = text.replace("\n", " ").replace("\r", " ")
    return _MARKDOWN.sub(r"\\\1", text)


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]
