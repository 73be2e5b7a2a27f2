"""The compose files, checked without a Docker engine: against the Compose Specification's own JSON
schema (vendored in tests/schemas/, from compose-spec/compose-spec), after interpolating variables the
way `docker compose` does, and against what the project requires of them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from workflows.search_attributes import ALL

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = json.loads((ROOT / "tests" / "schemas" / "compose-spec.json").read_text())
# The schema names draft-07 by an https URL that jsonschema does not map; draft-07 it is.
COMPOSE_SPEC = jsonschema.Draft7Validator(SCHEMA)
STACK, WORKER_ONLY = ROOT / "docker-compose.yml", ROOT / "docker-compose.worker.yml"
VARIABLE = re.compile(r"\$\$|\$\{(?P<name>\w+)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}|\$(?P<bare>\w+)")


class MissingVariable(Exception):
    pass


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's interpolation: ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, $$ (a dollar)."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match["name"] or match["bare"]
        op, arg, got = match["op"], match["arg"], env.get(name)
        if op in (":-", "-"):
            return got if got or (op == "-" and got is not None) else arg
        if op in (":?", "?") and not got:
            raise MissingVariable(f"{name}: {arg}")
        return got or ""

    return VARIABLE.sub(one, value)


def load(path: Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(path.read_text())
    given = env if env is not None else {"REBUILD_HOST": "kvm-1"}
    return interpolate(loaded, {"POSTGRES_PASSWORD": "from-the-env-file", **given})  # type: ignore[no-any-return]


def services(path: Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    found: dict[str, Any] = load(path, env)["services"]
    return found


@pytest.mark.parametrize("path", [STACK, WORKER_ONLY], ids=lambda p: p.name)
def test_compose_files_follow_the_compose_specification(path: Path) -> None:
    env = {"REBUILD_HOST": "kvm-1", "TEMPORAL_ADDRESS": "temporal.example:7233"}
    jsonschema.Draft7Validator.check_schema(SCHEMA)
    COMPOSE_SPEC.validate(yaml.safe_load(path.read_text()))  # as written
    COMPOSE_SPEC.validate(load(path, env))  # as docker compose sees it


def test_the_schema_check_catches_a_mistake() -> None:
    broken = load(STACK)
    broken["services"]["temporal"]["healthcheck"]["interval"] = ["5s"]
    with pytest.raises(jsonschema.ValidationError):
        COMPOSE_SPEC.validate(broken)


def test_the_stack_runs_temporal_server_with_the_schema_set_up_by_admin_tools() -> None:
    stack = services(STACK)
    assert not [s for s in stack.values() if "auto-setup" in s.get("image", "")], (
        "auto-setup is not built any more"
    )
    assert stack["temporal"]["image"].startswith("temporalio/server:")
    assert stack["temporal-schema"]["image"].startswith("temporalio/admin-tools:")
    assert stack["temporal"]["depends_on"]["temporal-schema"]["condition"] == "service_completed_successfully"
    assert stack["temporal-schema"]["depends_on"]["postgresql"]["condition"] == "service_healthy"
    assert stack["worker"]["depends_on"]["temporal-setup"]["condition"] == "service_completed_successfully"
    for script in ("setup-postgres.sh", "setup-temporal.sh"):
        assert (ROOT / "deploy" / "compose" / script).stat().st_mode & 0o111


def test_every_long_running_service_has_a_health_check() -> None:
    for name, service in services(STACK).items():
        one_shot = str(service.get("restart", "")).startswith("on-failure")
        assert one_shot or "healthcheck" in service, name


def test_nothing_is_published_beyond_localhost_by_default() -> None:
    for path in (STACK, WORKER_ONLY):
        env = {"REBUILD_HOST": "kvm-1", "TEMPORAL_ADDRESS": "t:7233"}
        for name, service in services(path, env).items():
            for port in service.get("ports", []):
                assert str(port).startswith("127.0.0.1:"), (path.name, name, port)
    opened = services(STACK, {"REBUILD_HOST": "kvm-1", "TEMPORAL_GRPC_BIND": "10.0.0.5"})
    assert opened["temporal"]["ports"] == ["10.0.0.5:7233:7233"]
    assert "ports" not in services(STACK)["postgresql"]


def test_the_worker_only_file_needs_temporal_address_and_the_stack_does_not() -> None:
    with pytest.raises(MissingVariable, match="TEMPORAL_ADDRESS"):
        load(WORKER_ONLY, {"REBUILD_HOST": "kvm-2"})
    alone = services(WORKER_ONLY, {"REBUILD_HOST": "kvm-2", "TEMPORAL_ADDRESS": "t.example:7233"})
    assert set(alone) == {"worker"}
    assert alone["worker"]["environment"]["TEMPORAL_ADDRESS"] == "t.example:7233"
    assert services(STACK)["worker"]["environment"]["TEMPORAL_ADDRESS"] == "temporal:7233"
    moved = services(STACK, {"REBUILD_HOST": "kvm-1", "TEMPORAL_ADDRESS": "other:7233"})
    assert moved["worker"]["environment"]["TEMPORAL_ADDRESS"] == "other:7233"


def test_the_stack_and_the_worker_only_file_run_the_same_worker() -> None:
    env = {"REBUILD_HOST": "kvm-1", "TEMPORAL_ADDRESS": "t:7233"}
    in_stack, alone = services(STACK, env)["worker"], services(WORKER_ONLY, env)["worker"]
    in_stack.pop("depends_on")
    assert in_stack == alone


def test_setup_registers_every_search_attribute_the_workflow_uses() -> None:
    script = (ROOT / "deploy" / "compose" / "setup-temporal.sh").read_text()
    registered = set(re.findall(r"--name (\w+) --type Keyword", script))
    assert registered == {key.name for key in ALL}
    assert set(re.search(r'attrs="([^"]+)"', script)[1].split()) == registered  # type: ignore[index]


def test_worker_mounts_libvirt_and_disk_paths_one_to_one() -> None:
    volumes = services(STACK)["worker"]["volumes"]
    pairs = [v.split(":") for v in volumes]
    assert ["/var/run/libvirt/libvirt-sock", "/var/run/libvirt/libvirt-sock"] in pairs
    assert all(outside == inside for outside, inside in pairs)


def test_the_api_reads_its_client_tokens_from_a_compose_secret() -> None:
    api = services(STACK)["api"]
    assert "api-tokens" in api["secrets"]
    assert api["environment"]["REBUILD_API_TOKENS_FILE"] == "/run/secrets/api-tokens"


def test_compose_validates_where_docker_compose_exists() -> None:
    docker = shutil.which("docker")
    if docker is None or subprocess.run([docker, "compose", "version"], capture_output=True).returncode:
        return  # the schema checks above stand in; this machine has no compose plugin
    env = {**os.environ, "REBUILD_HOST": "kvm-1", "POSTGRES_PASSWORD": "from-the-env-file"}
    done = subprocess.run([docker, "compose", "-f", str(STACK), "config", "-q"],
                          capture_output=True, text=True, env=env)  # fmt: skip
    assert done.returncode == 0, done.stderr


def test_systemd_units_run_commands_that_exist() -> None:
    scripts = {line.split("=", 1)[0].strip() for line in (ROOT / "pyproject.toml").read_text().splitlines()
               if line.startswith("rebuild")}  # fmt: skip
    for unit in (ROOT / "deploy" / "systemd").glob("*.service"):
        text = unit.read_text()
        assert "[Install]" in text
        command = re.search(r"ExecStart=\S+/bin/([\w-]+)", text)
        assert command and command.group(1) in scripts, unit.name


# Issue 24, finding 12: what a deployment from these files leaves open to whoever reaches it.


def test_the_stack_has_no_default_database_password() -> None:
    stack = yaml.safe_load(STACK.read_text())
    assert "temporal}" not in STACK.read_text().replace("${POSTGRES_PASSWORD:?", "")
    with pytest.raises(MissingVariable, match="POSTGRES_PASSWORD"):
        interpolate(stack, {"REBUILD_HOST": "kvm-1"})


def test_the_web_ui_allows_no_write_actions() -> None:
    assert services(STACK)["temporal-ui"]["environment"]["TEMPORAL_DISABLE_WRITE_ACTIONS"] == "true"


@pytest.mark.parametrize("path", [STACK, WORKER_ONLY], ids=lambda p: p.name)
def test_workers_and_the_api_get_the_codec_key_as_a_secret(path: Path) -> None:
    env = {"REBUILD_HOST": "kvm-1", "TEMPORAL_ADDRESS": "t:7233"}
    loaded = load(path, env)
    assert loaded["secrets"]["codec-key"] == {"file": "./secrets/codec-key"}
    for name in ("worker", "api") if path == STACK else ("worker",):
        service = loaded["services"][name]
        assert "codec-key" in service["secrets"], name
        assert service["environment"]["REBUILD_CODEC_KEY_FILE"] == "/run/secrets/codec-key", name


def test_the_worker_container_keeps_only_the_capabilities_it_needs_and_the_libvirt_socket() -> None:
    worker = services(STACK)["worker"]
    assert worker["cap_drop"] == ["ALL"]
    assert set(worker["cap_add"]) == {"CHOWN", "FOWNER", "DAC_OVERRIDE"}
    assert "no-new-privileges:true" in worker["security_opt"]
    mounted = [volume.split(":")[0] for volume in worker["volumes"]]
    assert "/var/run/libvirt" not in mounted
    assert [m for m in mounted if m.startswith("/var/run/libvirt")] == ["/var/run/libvirt/libvirt-sock"]


def test_the_env_example_says_where_the_codec_key_is_and_sets_no_path_the_api_cannot_read() -> None:
    example = (ROOT / "deploy" / "rebuild.env.example").read_text()
    assert "/etc/durable-rebuild/codec-key" in example
    assert not re.search(r"^REBUILD_CODEC_KEY_FILE=\S", example, re.M)


def test_the_demo_leaves_its_state_private(tmp_path: Path) -> None:
    from devtools.demo import secure_state_dir

    state = tmp_path / "state"
    state.mkdir(mode=0o755)
    (state / "temporal.db").write_text("histories")
    (state / "temporal.db").chmod(0o644)
    secure_state_dir(state)
    assert state.stat().st_mode & 0o777 == 0o711
    assert (state / "temporal.db").stat().st_mode & 0o777 == 0o600
