"""The per-build template unit, derived from the plain worker unit so that the two cannot drift."""

from __future__ import annotations

from pathlib import Path

UNITS = Path(__file__).resolve().parent.parent / "deploy" / "systemd"
PLAIN = UNITS / "rebuild-worker.service"
TEMPLATE = UNITS / "rebuild-worker@.service"

HEADER = """\
# One rebuild worker per build, for a Worker Versioning rollout: each build installed side by side in
# /opt/durable-rebuild/builds/BUILD (uv sync --no-dev there), then
#   systemctl enable --now rebuild-worker@1.4.0
# joins the deployment as that build; the old build's unit stops once its version is drained.
# Generated from rebuild-worker.service by `python -m devtools.units` (tests/test_systemd_units.py
# checks that it is): change that file, then run it again.
"""
# (the plain unit's text, the template's): everything else is the same.
CHANGES = (
    ("Description=durable-rebuild worker (Temporal) for this hypervisor",
     "Description=durable-rebuild worker (Temporal) for this hypervisor, build %i"),
    ("EnvironmentFile=/etc/durable-rebuild/rebuild.env\n",
     "EnvironmentFile=/etc/durable-rebuild/rebuild.env\nEnvironment=REBUILD_BUILD_ID=%i\n"),
    ("ExecStart=/opt/durable-rebuild/.venv/bin/rebuild-worker",
     "ExecStart=/opt/durable-rebuild/builds/%i/.venv/bin/rebuild-worker"),
)  # fmt: skip


def template_text(plain: str) -> str:
    lines = plain.splitlines(keepends=True)
    # The plain unit's own header (how to install it) gives way to the template's.
    body = "".join(lines[next(i for i, line in enumerate(lines) if not line.startswith("#")) :])
    for old, new in CHANGES:
        if old not in body:
            raise ValueError(f"rebuild-worker.service no longer has {old.strip()!r}")
        body = body.replace(old, new)
    return HEADER + body


if __name__ == "__main__":
    TEMPLATE.write_text(template_text(PLAIN.read_text()))
    print(f"wrote {TEMPLATE}")
