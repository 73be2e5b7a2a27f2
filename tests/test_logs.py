"""Logs as journald, a log pipeline and an operator's grep expect them (issue 26, point 3).

JSON lines carry the SDK's context as flat fields, not appended to the message; under systemd a line
has its syslog priority and no time of its own; the level is an option; the API's access log names
the client by its token.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from temporalio.client import Client

from common.logs import JsonFormatter
from starter.api import create_app
from starter.api_clients import ApiClients
from starter.http_kit import ClientAccessLogger

ROOT = Path(__file__).resolve().parent.parent
EMIT = """
import logging, sys
from common.logs import LogFormat, LogLevel, configure_logging
configure_logging(LogFormat(sys.argv[1]), LogLevel(sys.argv[2]))
log = logging.getLogger("rebuild.test")
log.debug("a debug line")
log.info("an info line")
log.warning("a warning line", extra={"instance": "web-1"})
"""


def emit(tmp_path: Path, log_format: str, level: str, journal: bool) -> list[str]:
    """What a process logs to a stderr that is (or is not) the journal stream systemd named."""
    out = tmp_path / "stderr"
    with open(out, "wb") as stderr:
        status = os.fstat(stderr.fileno())
        env = dict(os.environ)
        # journald's stream is our stderr, or (a child redirected elsewhere) some other file.
        env["JOURNAL_STREAM"] = f"{status.st_dev}:{status.st_ino if journal else status.st_ino + 1}"
        subprocess.run(
            [sys.executable, "-c", EMIT, log_format, level], cwd=ROOT, stderr=stderr, env=env, check=True
        )
    return out.read_text().splitlines()


def test_under_journald_a_line_has_its_priority_and_no_time_of_its_own(tmp_path: Path) -> None:
    assert emit(tmp_path, "text", "info", journal=True) == [
        "<6>INFO rebuild.test: an info line",
        "<4>WARNING rebuild.test: a warning line",
    ]
    (warning,) = emit(tmp_path, "json", "warning", journal=True)
    assert warning.startswith("<4>{")
    entry = json.loads(warning.removeprefix("<4>"))
    assert "time" not in entry
    assert entry["level"] == "warning" and entry["instance"] == "web-1"


def test_elsewhere_a_line_has_its_time_and_no_priority(tmp_path: Path) -> None:
    lines = emit(tmp_path, "text", "debug", journal=False)
    assert len(lines) == 3
    assert lines[0].endswith("DEBUG rebuild.test: a debug line")
    assert not any(line.startswith("<") for line in lines)
    assert lines[0][:4].isdigit()  # the asctime


def test_the_sdks_context_becomes_fields_not_part_of_the_message() -> None:
    record = logging.LogRecord("temporalio.workflow", logging.INFO, "", 0, "web-1 on kvm-1: phase stop",
                               None, None)  # fmt: skip
    context: dict[str, Any] = {
        "temporal_workflow": {"workflow_id": "rebuild:kvm-1:web-1", "run_id": "r1", "attempt": 1,
                              "workflow_type": "RebuildInstance", "task_queue": "rebuild-workflows"},
        "instance": "web-1", "host": "kvm-1", "phase": "stop",
    }  # fmt: skip
    record.__dict__.update(context)
    entry = json.loads(JsonFormatter().format(record))
    assert entry["message"] == "web-1 on kvm-1: phase stop"
    assert {k: entry[k] for k in ("workflow_id", "run_id", "attempt", "instance", "host", "phase")} == {
        "workflow_id": "rebuild:kvm-1:web-1", "run_id": "r1", "attempt": 1,
        "instance": "web-1", "host": "kvm-1", "phase": "stop",
    }  # fmt: skip
    assert "temporal_workflow" not in entry
    activity = logging.LogRecord("temporalio.activity", logging.INFO, "", 0, "done", None, None)
    activity.__dict__["temporal_activity"] = {
        "activity_type": "fetch_image",
        "activity_id": "5",
        "workflow_run_id": "r1",
        "attempt": 3,
    }
    lifted = json.loads(JsonFormatter().format(activity))
    assert (lifted["activity"], lifted["run_id"], lifted["attempt"]) == ("fetch_image", "r1", 3)


async def test_the_api_access_log_names_the_client(
    client: Client, unique_host: str, caplog: pytest.LogCaptureFixture
) -> None:
    clients = ApiClients.parse(
        f"portal portal-token-0123456789 hosts={unique_host} instances=* verbs=start\n"
    )
    server = TestServer(create_app(client, clients))
    # As rebuild-api runs it.
    await server.start_server(
        access_log=logging.getLogger("rebuild.api.access"), access_log_class=ClientAccessLogger
    )
    api = TestClient(server)
    await api.start_server()
    try:
        with caplog.at_level(logging.INFO, logger="rebuild.api.access"):
            headers = {"Authorization": "Bearer portal-token-0123456789"}
            assert (await api.get(f"/v1/rebuilds/{unique_host}/nobody", headers=headers)).status == 404
            assert (await api.get("/v1/rebuilds", headers={"Authorization": "Bearer wrong"})).status == 401
            assert (await api.get("/healthz")).status == 200
    finally:
        await api.close()
    lines = [r for r in caplog.records if r.name == "rebuild.api.access"]
    assert [(r.__dict__["client"], r.__dict__["path"], r.__dict__["status"]) for r in lines] == [
        ("portal", f"/v1/rebuilds/{unique_host}/nobody", 404),
        ("-", "/v1/rebuilds", 401),
    ]
    assert lines[0].getMessage().startswith(f"portal GET /v1/rebuilds/{unique_host}/nobody 404 ")
