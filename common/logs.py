"""Log output for the worker and the API: readable lines for a terminal, or one JSON object a line
for a log pipeline (journald, Loki, Elasticsearch).

The SDK's workflow and activity loggers put the workflow's and activity's identity on each record
(``temporal_workflow``, ``temporal_activity``). The JSON form lifts those into flat fields
(``workflow_id``, ``run_id``, ``attempt``, ``activity``, ...), next to the project's own (``instance``,
``host``, ``phase``), and leaves the message as it was written: a pipeline finds every line of one
rebuild by a field, not by parsing text.

Under systemd (``JOURNAL_STREAM`` names our stderr) each line starts with its syslog priority
(``<4>`` for a warning) and carries no time of its own: journald stamps it, and ``journalctl -p
warning`` then finds the warnings.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, TextIO

from temporalio import activity, workflow

# Attributes every LogRecord has; anything else on a record was passed as ``extra``.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}
# The SDK's context, by the field name it gets in a JSON line.
_WORKFLOW_FIELDS = {
    "workflow_id": "workflow_id",
    "run_id": "run_id",
    "workflow_type": "workflow_type",
    "task_queue": "task_queue",
    "attempt": "attempt",
    "namespace": "namespace",
}
_ACTIVITY_FIELDS = {
    "workflow_id": "workflow_id",
    "workflow_run_id": "run_id",
    "workflow_type": "workflow_type",
    "task_queue": "task_queue",
    "attempt": "attempt",
    "activity_type": "activity",
    "activity_id": "activity_id",
    "namespace": "namespace",
}
# syslog priorities (sd-daemon(3)): what journald reads from a line's ``<N>`` prefix.
_PRIORITY = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}


class LogFormat(StrEnum):
    TEXT = "text"
    JSON = "json"


class LogLevel(StrEnum):
    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


def fields(record: logging.LogRecord) -> dict[str, Any]:
    """A record's context as flat fields: the SDK's identity of its workflow or activity, and what
    the call passed as ``extra``."""
    found: dict[str, Any] = {}
    for key, value in vars(record).items():
        if key in _STANDARD or key.startswith("_"):
            continue
        if key == "temporal_workflow" and isinstance(value, dict):
            found.update({_WORKFLOW_FIELDS[k]: v for k, v in value.items() if k in _WORKFLOW_FIELDS})
        elif key == "temporal_activity" and isinstance(value, dict):
            found.update({_ACTIVITY_FIELDS[k]: v for k, v in value.items() if k in _ACTIVITY_FIELDS})
        else:
            found[key] = value
    return found


class JsonFormatter(logging.Formatter):
    def __init__(self, with_time: bool = True) -> None:
        super().__init__()
        self.with_time = with_time

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {}
        if self.with_time:
            entry["time"] = datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
        entry.update(level=record.levelname.lower(), logger=record.name, message=record.getMessage())
        entry.update(fields(record))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class JournalPrefix(logging.Formatter):
    """Another formatter's line, with the syslog priority journald reads in front of it."""

    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        priority = _PRIORITY.get(record.levelno, 6 if record.levelno < logging.WARNING else 3)
        # A multi-line record (a traceback) is one journal entry per line: each gets the priority.
        return "\n".join(f"<{priority}>{line}" for line in self.inner.format(record).splitlines())


def under_journald(stream: TextIO = sys.stderr) -> bool:
    """Whether ``stream`` is the journal stream systemd gave us (its ``JOURNAL_STREAM``, device:inode).

    A child whose stderr was redirected elsewhere inherits the variable but not the stream, hence
    the comparison (as sd_journal_stream_fd(3) describes).
    """
    named = os.environ.get("JOURNAL_STREAM", "")
    device, _, inode = named.partition(":")
    if not device.isdigit() or not inode.isdigit():
        return False
    try:
        status = os.fstat(stream.fileno())
    except (OSError, ValueError):
        return False
    return (status.st_dev, status.st_ino) == (int(device), int(inode))


def configure_logging(log_format: LogFormat, level: LogLevel = LogLevel.INFO) -> None:
    """Send the process's logs to stderr in the chosen format (replacing earlier handlers)."""
    journal = under_journald()
    handler = logging.StreamHandler(sys.stderr)
    formatter: logging.Formatter
    if log_format is LogFormat.JSON:
        formatter = JsonFormatter(with_time=not journal)
    elif journal:
        formatter = logging.Formatter("%(levelname)s %(name)s: %(message)s")
    else:
        formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    handler.setFormatter(JournalPrefix(formatter) if journal else formatter)
    # In JSON the SDK's context is in fields; appended to the message too, it would be there twice.
    workflow.logger.workflow_info_on_message = log_format is LogFormat.TEXT
    activity.logger.activity_info_on_message = log_format is LogFormat.TEXT
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiohttp's own access log is one line a request, without the client: the API logs its own.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
