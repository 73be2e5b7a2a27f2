"""The house's walls: who may import whom (STYLE.md: sideways imports make a house unreadable)."""

from __future__ import annotations

import json
import subprocess
import sys


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


def test_the_worker_does_not_import_from_the_starter() -> None:
    loaded = modules_loaded_by("worker")
    assert [m for m in loaded if m == "starter" or m.startswith("starter.")] == []
