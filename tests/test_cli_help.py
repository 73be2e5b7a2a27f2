"""``--help`` of every command reads at 80 columns (issue 25, point 7): run as an operator runs it, a
subprocess with ``COLUMNS=80``; every option name whole, options in panels, no ``<bool>``."""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
import typer

import worker
from devtools.testbed.e2e import BIN
from starter import api
from starter.cli import app


def _commands(command: Any, path: list[str]) -> Iterator[tuple[list[str], Any]]:
    yield path, command
    for name, sub in sorted(getattr(command, "commands", {}).items()):
        yield from _commands(sub, [*path, name])


COMMANDS = [
    *((["rebuild", *path], command) for path, command in _commands(typer.main.get_command(app), [])),
    (["rebuild-worker"], typer.main.get_command(worker.app)),
    (["rebuild-api"], typer.main.get_command(api.app)),
]


def option_names(command: Any) -> list[str]:
    return [
        name
        for param in command.params
        if not getattr(param, "hidden", False)
        for name in (*param.opts, *getattr(param, "secondary_opts", ()))
        if name.startswith("-")
    ]


def shown_at_80(argv: list[str]) -> str:
    env = dict(os.environ, COLUMNS="80")
    env.pop("TERMINAL_WIDTH", None)
    done = subprocess.run(
        [str(BIN / argv[0]), *argv[1:], "--help"], capture_output=True, text=True, env=env, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.parametrize(("argv", "command"), COMMANDS, ids=[" ".join(argv) for argv, _ in COMMANDS])
def test_help_at_80_columns_shows_every_option_name_whole(argv: list[str], command: Any) -> None:
    shown = shown_at_80(argv)
    cut = [
        name
        for name in option_names(command)
        if not re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", shown)
    ]
    assert cut == [], f"{' '.join(argv)} --help cuts {cut}:\n{shown}"
    assert "<bool>" not in shown
    assert max(len(line) for line in shown.splitlines()) <= 80


def test_rebuild_start_groups_its_options_in_panels() -> None:
    shown = shown_at_80(["rebuild", "start"])
    panels = re.findall(r"╭─ (.+?) ─", shown)
    assert panels == [
        "Arguments",
        "Options",
        "Image",
        "Stop, boot and verify",
        "Approval and confirm window",
        "Guest identity (Nova's rebuild options; not given: kept)",
        "Root disk",
    ]
    fleet = re.findall(r"╭─ (.+?) ─", shown_at_80(["rebuild", "fleet", "start"]))
    assert {"Image", "Which instances", "Pace and failure budget", "Stop, boot and verify"} <= set(fleet)
