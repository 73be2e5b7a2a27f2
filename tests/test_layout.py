"""The house's walls: who may import whom (STYLE.md: sideways imports make a house unreadable)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from temporalio import activity, workflow

from worker import WorkerConfig, host_activities
from workflows import contract, names
from workflows.fleet import FleetRebuild
from workflows.rebuild import RebuildInstance


def modules_loaded_by(*imports: str) -> list[str]:
    code = f"import json, sys; import {', '.join(imports)}; print(json.dumps(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded: list[str] = json.loads(done.stdout)
    return loaded


def test_the_cli_and_the_api_load_neither_libvirt_nor_the_workflow_nor_activities() -> None:
    loaded = modules_loaded_by("starter.cli", "starter.api", "starter.rebuilds")
    assert "libvirt" not in loaded
    assert "workflows.rebuild" not in loaded
    assert [m for m in loaded if m == "activities" or m.startswith("activities.")] == []


def test_building_the_cli_loads_neither_temporalio_nor_pydantic_nor_the_models() -> None:
    # `rebuild --help` pays for Typer and rich only; a command loads what its work needs when it runs.
    loaded = modules_loaded_by("starter.cli")
    heavy = ("temporalio", "pydantic", "aiohttp", "libvirt", "passlib", "asyncio", "workflows.models")
    assert [m for m in loaded if m.split(".")[0] in heavy or m in heavy] == []


def test_the_worker_does_not_import_from_the_starter() -> None:
    loaded = modules_loaded_by("worker")
    assert [m for m in loaded if m == "starter" or m.startswith("starter.")] == []


def test_the_workflows_load_neither_libvirt_nor_any_activity() -> None:
    # Seam 1: a workflow sandbox imports the contract (typed stubs), never the activities' code.
    loaded = modules_loaded_by("workflows.rebuild", "workflows.fleet")
    assert "libvirt" not in loaded
    assert "aiohttp" not in loaded
    assert [m for m in loaded if m == "activities" or m.startswith("activities.")] == []


def test_every_stub_the_workflows_call_is_an_activity_the_worker_registers(tmp_path: Path) -> None:
    config = WorkerConfig(host="layout", libvirt_uri="test:///default", state_dir=tmp_path / "state")
    definitions = map(activity._Definition.must_from_callable, host_activities(config))
    registered = {str(d.name): d for d in definitions}
    stubs = {stub.name: stub for stub in contract.STUBS}
    assert sorted(stubs) == sorted(registered)
    for name, stub in stubs.items():
        real = registered[name]
        assert real.arg_types == [stub.takes], name
        # A stub may leave out the None an activity answered in old histories: None decodes anyway.
        assert real.ret_type in (stub.gives, stub.gives | None), name


def test_the_workflows_answer_to_the_names_clients_and_histories_use() -> None:
    rebuild = workflow._Definition.must_from_class(RebuildInstance)
    assert rebuild.name == names.WORKFLOW_NAME
    assert set(rebuild.queries) == {names.STATUS_QUERY}
    assert set(rebuild.signals) == {
        names.APPROVE_SIGNAL, names.CONFIRM_SIGNAL, names.REVERT_SIGNAL, names.ABORT_SIGNAL,
    }  # fmt: skip
    assert set(rebuild.updates) == {names.ABORT_UPDATE}
    fleet = workflow._Definition.must_from_class(FleetRebuild)
    assert fleet.name == names.FLEET_WORKFLOW
    assert set(fleet.queries) == {names.FLEET_STATUS_QUERY, names.FLEET_INSTANCES_QUERY}
    assert set(fleet.updates) == {
        names.PAUSE_UPDATE, names.RESUME_UPDATE, names.SET_BATCH_SIZE_UPDATE, names.ABORT_FLEET_UPDATE,
    }  # fmt: skip


PRODUCT = ("activities", "starter", "workflows", "common", "worker.py")
XML_CALLS = re.compile(r"\bET\.(fromstring|tostring|parse|iterparse|SubElement|XML|canonicalize|Element)\(")


def product_files() -> list[Path]:
    root = Path(__file__).resolve().parent.parent
    found: list[Path] = []
    for name in PRODUCT:
        path = root / name
        found.extend([path] if path.is_file() else sorted(path.rglob("*.py")))
    return found


def test_only_activities_domain_xml_parses_or_builds_domain_xml() -> None:
    """One home for the XML rules (Nova's config objects): the rest asks it, or holds its elements."""
    offenders = [
        f"{path.relative_to(path.parents[1])}:{number}"
        for path in product_files()
        if "domain_xml" not in path.parts
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if XML_CALLS.search(line)
    ]
    assert offenders == []


def test_only_the_libvirt_layer_imports_libvirt() -> None:
    """libvirt's C-style API and its errors are met in activities/libvirt_*.py and nowhere else."""
    importing = [
        str(path.name)
        for path in sorted(product_files())
        if re.search(r"^\s*(import|from) libvirt(_qemu)?\b", path.read_text(), re.MULTILINE)
    ]
    assert importing == [
        "libvirt_backup.py",
        "libvirt_console.py",
        "libvirt_domain.py",
        "libvirt_secret.py",
        "libvirt_storage.py",
    ]


def test_benches_and_devtools_import_nothing_from_tests() -> None:
    """The test bed lives in devtools/testbed, shared by tests, benches and the demo; tests/ is a leaf."""
    root = Path(__file__).resolve().parent.parent
    offenders = [
        str(path.relative_to(root))
        for folder in ("bench", "devtools")
        for path in sorted((root / folder).rglob("*.py"))
        if re.search(r"^\s*(from|import) tests\b", path.read_text(), re.MULTILINE)
    ]
    assert offenders == []
