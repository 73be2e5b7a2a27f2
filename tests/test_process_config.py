"""Configuration as a systemd deployment needs it (issue 26, point 4): every option of the worker and
the API has its environment variable, test hooks stay out of the production --help, and a TOML file
of the same names sets defaults that the environment and the command line still override.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from typer.main import get_command

import worker
from common.exit_codes import ExitCode
from devtools.testbed.e2e import BIN
from starter import api


@pytest.mark.parametrize("app", [worker.app, api.app], ids=["rebuild-worker", "rebuild-api"])
def test_every_option_has_its_environment_variable(app: object) -> None:
    command = get_command(app)  # type: ignore[arg-type]
    options = [p for p in command.params if p.param_type_name == "option" and p.name != "help"]
    missing = [p.opts[0] for p in options if not p.envvar]
    assert options and missing == []


def test_test_hooks_are_not_in_the_production_help() -> None:
    shown = subprocess.run(
        [str(BIN / "rebuild-worker"), "--help"], capture_output=True, text=True, check=True
    )
    assert "--pause-dir" not in shown.stdout
    assert "--config" in shown.stdout and "--log-level" in shown.stdout


def worker_with(tmp_path: Path, settings: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """rebuild-worker with a configuration file, stopped at its first check (the host name)."""
    config = tmp_path / "worker.toml"
    config.write_text(settings)
    environment = {k: v for k, v in os.environ.items() if k != "REBUILD_HOST"}
    return subprocess.run(
        [str(BIN / "rebuild-worker"), "--config", str(config), *args],
        capture_output=True, text=True, timeout=60, env={**environment, **env},
    )  # fmt: skip


def test_a_configuration_file_sets_the_defaults_and_the_environment_and_command_line_win(
    tmp_path: Path,
) -> None:
    from_file = worker_with(tmp_path, 'host = "from file!"\nstate-dir = "/srv/rebuild"\n')
    assert from_file.returncode == ExitCode.BAD_INPUT
    assert "not a usable host name: 'from file!'" in from_file.stderr
    from_env = worker_with(tmp_path, 'host = "from file!"\n', REBUILD_HOST="from env!")
    assert "'from env!'" in from_env.stderr
    from_line = worker_with(tmp_path, 'host = "from file!"\n', "--host", "from line!", REBUILD_HOST="env!")
    assert "'from line!'" in from_line.stderr


@pytest.mark.parametrize(
    ("settings", "said"),
    [
        ("hots = 'kvm-1'\n", "unknown setting 'hots'"),
        ("pause-dir = '/tmp'\n", "unknown setting 'pause-dir'"),
        ("host = [\n", "is not TOML"),
        ("[host]\nname = 'x'\n", "must be a value, not a table"),
    ],
)
def test_a_bad_configuration_file_is_refused_at_start_with_its_name(
    tmp_path: Path, settings: str, said: str
) -> None:
    refused = worker_with(tmp_path, settings)
    assert refused.returncode == ExitCode.BAD_INPUT
    assert refused.stderr.startswith(f"rebuild-worker: configuration file {tmp_path / 'worker.toml'}")
    assert said in refused.stderr
    assert "Traceback" not in refused.stderr


def test_the_api_reads_its_own_configuration_file(tmp_path: Path) -> None:
    config = tmp_path / "api.toml"
    config.write_text("tokens-file = '/nonexistent/tokens'\n")
    refused = subprocess.run(
        [str(BIN / "rebuild-api")], capture_output=True, text=True, timeout=60,
        env={**os.environ, "REBUILD_API_CONFIG": str(config)},
    )  # fmt: skip
    assert refused.returncode == ExitCode.BAD_INPUT
    assert "/nonexistent/tokens" in refused.stderr
