"""`make ui-screenshot`: the demo's workflow by default, and no not-found page saved as a screenshot."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest

from devtools import demo, ui_screenshot
from workflows.names import rebuild_workflow_id


def test_the_default_workflow_is_the_demos() -> None:
    """The demo names its rebuild rebuild:<host>:demo-vm and serves the UI on its port: so does this."""
    assert (ui_screenshot.DEMO_VM, ui_screenshot.UI_PORT) == (demo.VM, demo.UI_PORT)
    assert rebuild_workflow_id(socket.gethostname(), demo.VM) == f"rebuild:{socket.gethostname()}:demo-vm"


@pytest.mark.parametrize(
    "dom",
    [
        "<html><head><title>404 | Temporal</title></head><body></body></html>",
        "<html><head><title>Temporal</title></head><body><h1>404</h1><p>Not Found</p></body></html>",
        "<html><body><div>Workflow not found</div><script>var x = 'ok'</script></body></html>",
    ],
)
def test_a_not_found_page_is_recognised(dom: str) -> None:
    assert ui_screenshot.looks_not_found(dom)


def test_a_workflow_page_is_not_taken_for_not_found() -> None:
    dom = (
        "<html><head><title>rebuild:kvm:demo-vm | Temporal</title><script>if (s === 404) {}</script></head>"
        "<body><h1>rebuild:kvm:demo-vm</h1><p>Completed</p><p>Start 11:29:08.404 AM</p></body></html>"
    )
    assert not ui_screenshot.looks_not_found(dom)


def test_a_missing_page_exits_non_zero_without_saving(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    out = tmp_path / "shot.png"
    monkeypatch.setattr("shutil.which", lambda _name: "/bin/true")
    monkeypatch.setattr(ui_screenshot, "port_open", lambda _port: True)
    asked: list[tuple[int, str, str]] = []

    def missing(ui_port: int, namespace: str, workflow_id: str) -> bool:
        asked.append((ui_port, namespace, workflow_id))
        return True

    monkeypatch.setattr(ui_screenshot, "workflow_missing", missing)
    monkeypatch.setattr(sys, "argv", ["ui_screenshot", "--out", str(out)])
    with pytest.raises(SystemExit) as raised:
        ui_screenshot.main()
    assert raised.value.code not in (0, None)
    assert not out.exists()
    assert asked == [(8233, "default", f"rebuild:{socket.gethostname()}:demo-vm")]
