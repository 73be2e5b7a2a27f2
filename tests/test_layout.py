"""The house's walls: who may import whom (STYLE.md: sideways imports make a house unreadable)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path


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
    assert importing == ["libvirt_console.py", "libvirt_domain.py"]
