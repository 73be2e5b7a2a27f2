"""An optional TOML file of a process's options, for what does not belong on a command line.

Its keys are the options' names without the dashes (``state-dir`` or ``state_dir``); the command line
and the environment still win over it, and it over the built-in defaults (click's ``default_map``).
An unknown key, or a file that is not TOML, is refused at start with the file's name: a typo must not
silently fall back to a default.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

CONFIG_OPTION = "--config"


class ConfigFileError(ValueError):
    """The configuration file cannot be read, is not TOML, or names an option the process lacks."""


def config_path(argv: Sequence[str], envvar: str) -> Path | None:
    """Where ``--config FILE`` (or ``--config=FILE``, or the variable) points, read before click
    parses the rest: its values are the defaults the rest is parsed against."""
    for index, arg in enumerate(argv):
        if arg == CONFIG_OPTION and index + 1 < len(argv):
            return Path(argv[index + 1])
        if arg.startswith(f"{CONFIG_OPTION}="):
            return Path(arg.split("=", 1)[1])
    named = os.environ.get(envvar)
    return Path(named) if named else None


def load_defaults(path: Path, command: Any) -> dict[str, Any]:
    """The file's settings as ``default_map`` for ``command``, checked against its options."""
    try:
        with open(path, "rb") as file:
            settings = tomllib.load(file)
    except OSError as err:
        raise ConfigFileError(f"configuration file {path}: {err.strerror}") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigFileError(f"configuration file {path} is not TOML: {err}") from None
    options = {
        param.name: param
        for param in command.params
        # Typer's click (vendored): options, not arguments; the hidden test hooks are not settings.
        if param.param_type_name == "option"
        and param.name
        and not param.hidden
        and param.name != "config_file"
    }
    defaults: dict[str, Any] = {}
    for key, value in settings.items():
        name = key.replace("-", "_")
        if name not in options:
            known = ", ".join(sorted(n.replace("_", "-") for n in options))
            raise ConfigFileError(f"configuration file {path}: unknown setting {key!r} (known: {known})")
        if isinstance(value, dict):
            raise ConfigFileError(f"configuration file {path}: {key!r} must be a value, not a table")
        defaults[name] = value
    return defaults


def run_with_config(app: Any, prog: str, envvar: str) -> None:
    """Run a single-command Typer ``app`` with the configuration file's settings as its defaults."""
    import sys

    from typer.main import get_command

    from common.exit_codes import ExitCode

    try:
        path = config_path(sys.argv[1:], envvar)
        defaults = load_defaults(path, get_command(app)) if path else None
    except ConfigFileError as err:
        print(f"{prog}: {err}", file=sys.stderr)
        raise SystemExit(ExitCode.BAD_INPUT) from None
    app(default_map=defaults, prog_name=prog)
