"""The CLI's connection settings, as the `temporal` CLI names them, and its errors under --json."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from pathlib import Path

from common.exit_codes import ExitCode
from devtools.temporal_dev import DevServer
from devtools.testbed.e2e import BIN, rebuild_cli
from starter.cli_settings import package_version


def run(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("TEMPORAL_", "REBUILD_"))}
    return subprocess.run(
        [str(BIN / "rebuild"), *args], capture_output=True, text=True, env={**environment, **env}, timeout=60
    )


def test_version() -> None:
    done = run("--version")
    assert done.returncode == 0
    assert done.stdout.strip() == f"rebuild (durable-rebuild) {package_version()}"
    assert package_version()[0].isdigit()


async def test_a_profile_from_the_config_file_is_used_and_a_flag_beats_it(
    dev_server: DevServer, tmp_path: Path
) -> None:
    config = tmp_path / "temporal.toml"
    config.write_text(
        f'[profile.default]\naddress = "{dev_server.address}"\n\n[profile.staging]\naddress = "127.0.0.1:1"\n'
    )
    staging = await asyncio.to_thread(run, "--config-file", str(config), "--profile", "staging",
                                      "status", "vm-1", "--host", "h1")  # fmt: skip
    assert staging.returncode == 3
    assert "127.0.0.1:1" in staging.stderr
    default = await asyncio.to_thread(run, "--config-file", str(config), "status", "vm-1", "--host", "h1")
    assert default.returncode == 2  # reached Temporal: no such rebuild
    assert "no rebuild of vm-1 on h1" in default.stderr
    flag = await asyncio.to_thread(run, "--config-file", str(config), "--address", "127.0.0.1:1",
                                   "status", "vm-1", "--host", "h1")  # fmt: skip
    assert flag.returncode == 3


async def test_an_unknown_namespace_is_a_message_not_a_traceback(dev_server: DevServer) -> None:
    done = await rebuild_cli(dev_server.address, "--namespace", "no-such-ns", "list")
    assert done.code == 1
    assert "no-such-ns" in done.stderr
    assert "Traceback" not in done.stderr
    env = {"TEMPORAL_ADDRESS": dev_server.address, "TEMPORAL_NAMESPACE": "no-such-ns"}
    via_env = await asyncio.to_thread(run, "list", "--json", **env)
    assert via_env.returncode == 1
    assert "no-such-ns" in json.loads(via_env.stdout)["error"]
    fleets = await asyncio.to_thread(run, "fleet", "list", "--json", **env)
    assert fleets.returncode == 1, fleets.stderr
    assert json.loads(fleets.stdout) == json.loads(via_env.stdout)


async def test_common_options_come_from_the_environment(dev_server: DevServer) -> None:
    env = {"TEMPORAL_ADDRESS": dev_server.address, "REBUILD_HOST": "kvm-from-env"}
    done = await asyncio.to_thread(run, "status", "vm-1", "--json", **env)
    assert done.returncode == 2
    assert json.loads(done.stdout) == {"error": "no rebuild of vm-1 on kvm-from-env is known", "exit_code": 2}


def test_errors_are_json_under_json_usage_errors_included() -> None:
    unreachable = run("status", "vm-1", "--host", "h", "--json", TEMPORAL_ADDRESS="127.0.0.1:1")
    assert unreachable.returncode == 3
    assert json.loads(unreachable.stdout)["exit_code"] == 3
    missing = run("status", "--json")
    assert missing.returncode == 2
    assert json.loads(missing.stdout) == {"error": "Missing argument 'instance'.", "exit_code": 2}
    plain = run("status")
    assert plain.returncode == 2
    assert "Missing argument" in plain.stderr


def test_every_command_group_says_that_temporal_is_unreachable_alike() -> None:
    unreachable = {"TEMPORAL_ADDRESS": "127.0.0.1:1"}
    rebuild = run("status", "vm-1", "--host", "h", "--json", **unreachable)
    fleet = run("fleet", "status", "fleet-1", "--json", **unreachable)
    assert rebuild.returncode == fleet.returncode == ExitCode.UNAVAILABLE
    assert json.loads(fleet.stdout) == json.loads(rebuild.stdout)
    assert json.loads(fleet.stdout)["exit_code"] == ExitCode.UNAVAILABLE
    assert fleet.stderr == ""
    plain = run("fleet", "status", "fleet-1", **unreachable)
    assert plain.returncode == ExitCode.UNAVAILABLE
    assert plain.stdout == ""
    assert plain.stderr.startswith("rebuild fleet: cannot reach Temporal at 127.0.0.1:1")


def test_json_mode_is_the_commands_option_not_a_word_anywhere_on_the_line() -> None:
    # Here "--json" is the abort's reason, so the error is a line on stderr.
    done = run("abort", "vm-1", "--host", "h", "--reason", "--json", TEMPORAL_ADDRESS="127.0.0.1:1")
    assert done.returncode == ExitCode.UNAVAILABLE
    assert done.stdout == ""
    assert done.stderr.startswith("rebuild: cannot reach Temporal at 127.0.0.1:1")
    marker = run("start", "vm-1", "--boot-marker", "--json", "--bogus")
    assert marker.returncode == ExitCode.BAD_INPUT
    assert marker.stdout == ""
    assert "No such option: --bogus" in marker.stderr


def test_options_that_cannot_be_used_are_json_under_json_in_every_group() -> None:
    start = run("start", "vm-1", "--host", "h", "--image", "ftp://x/y", "--json")
    assert start.returncode == ExitCode.BAD_INPUT
    assert json.loads(start.stdout) == {
        "error": "invalid request: --image: image URL must be http://, https:// or file:///: 'ftp://x/y'",
        "exit_code": 2,
    }
    fleet = run("fleet", "start", "--image", "http://x/y", "--json")
    assert fleet.returncode == ExitCode.BAD_INPUT
    assert json.loads(fleet.stdout) == {
        "error": "choose the instances with exactly one of --instances-file and --select",
        "exit_code": 2,
    }
    assert fleet.stderr == ""


def test_rebuild_cache_says_libvirt_is_unreachable_as_json_under_json(tmp_path: Path) -> None:
    options = ["--libvirt-uri", "qemu+tcp://127.0.0.1:1/system", "--state-dir", str(tmp_path)]
    done = run("cache", "list", *options, "--json")
    assert done.returncode == ExitCode.UNAVAILABLE
    assert json.loads(done.stdout)["error"].startswith("cannot connect to libvirt at qemu+tcp://127.0.0.1:1")
    assert json.loads(done.stdout)["exit_code"] == ExitCode.UNAVAILABLE


def test_usage_errors_are_json_under_json_wherever_it_stands() -> None:
    unknown = run("status", "vm-1", "--json", "--hots", "h")
    assert unknown.returncode == ExitCode.BAD_INPUT
    assert json.loads(unknown.stdout)["error"].startswith("No such option: --hots")
    without_value = run("fleet", "status", "fleet-1", "--json", "--state")
    assert json.loads(without_value.stdout) == {
        "error": "Option '--state' requires an argument.",
        "exit_code": 2,
    }
    typo = run("fleet", "stauts", "fleet-1", "--json")
    assert typo.returncode == ExitCode.BAD_INPUT
    assert json.loads(typo.stdout)["error"].startswith("No such command 'stauts'")


def test_shell_completion_completes_commands() -> None:
    done = run(_REBUILD_COMPLETE="complete_bash", COMP_WORDS="rebuild sta", COMP_CWORD="1")
    assert done.returncode == 0
    assert set(done.stdout.split()) == {"start", "status"}
    assert "--install-completion" in run("--help", COLUMNS="200").stdout
