"""The production shape, checked without a Docker engine: the compose file, units and their commands.

`docker compose config` needs an engine's plugin this machine lacks, so the compose file is checked
against what the project itself requires of it.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import yaml

from workflows.search_attributes import ALL

ROOT = Path(__file__).resolve().parent.parent


def compose() -> dict[str, object]:
    loaded: dict[str, object] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return loaded


def test_compose_has_the_production_services() -> None:
    services = compose()["services"]
    assert isinstance(services, dict)
    assert {"postgresql", "temporal", "temporal-admin-tools", "temporal-ui", "worker", "api"} <= set(services)
    assert services["temporal"]["environment"]["DB"] == "postgres12"
    assert (
        services["worker"]["depends_on"]["temporal-admin-tools"]["condition"]
        == "service_completed_successfully"
    )


def test_admin_tools_register_every_search_attribute_the_workflow_uses() -> None:
    script = "\n".join(compose()["services"]["temporal-admin-tools"]["command"])  # type: ignore[index]
    registered = set(re.findall(r"--name (\w+) --type Keyword", script))
    assert registered == {key.name for key in ALL}


def test_worker_mounts_libvirt_and_disk_paths_one_to_one() -> None:
    volumes = compose()["services"]["worker"]["volumes"]  # type: ignore[index]
    pairs = [v.split(":") for v in volumes]
    assert ["/var/run/libvirt", "/var/run/libvirt"] in pairs
    assert all(outside == inside for outside, inside in pairs)


def test_compose_validates_where_docker_compose_exists() -> None:
    docker = shutil.which("docker")
    if docker is None or subprocess.run([docker, "compose", "version"], capture_output=True).returncode:
        return  # checked structurally above; the engine's plugin is not on this machine
    done = subprocess.run([docker, "compose", "-f", str(ROOT / "docker-compose.yml"), "config", "-q"],
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr


def test_systemd_units_run_commands_that_exist() -> None:
    scripts = {line.split("=", 1)[0].strip() for line in (ROOT / "pyproject.toml").read_text().splitlines()
               if line.startswith("rebuild")}  # fmt: skip
    for unit in (ROOT / "deploy" / "systemd").glob("*.service"):
        text = unit.read_text()
        assert "[Install]" in text
        command = re.search(r"ExecStart=\S+/bin/([\w-]+)", text)
        assert command and command.group(1) in scripts, unit.name
