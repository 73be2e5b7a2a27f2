"""One table of exit codes for every command: ``rebuild``, ``rebuild-worker`` and ``rebuild-api``.

Scripts branch on these, so a code keeps its meaning across commands and releases.
"""

from __future__ import annotations

import os
import sys
from enum import IntEnum
from typing import NoReturn


class ExitCode(IntEnum):
    OK = 0
    FAILED = 1
    BAD_INPUT = 2
    UNAVAILABLE = 3
    ENDED_WITHOUT_RESULT = 4
    INTERRUPTED = 130


MEANING = {
    ExitCode.OK: (
        "done as asked: rebuilt, planned (a dry run), signal sent, abort accepted; status of a running or "
        "completed rebuild"
    ),
    ExitCode.FAILED: "the rebuild failed (rolled back, or nothing changed), or an abort was refused",
    ExitCode.BAD_INPUT: (
        "bad input: a malformed option, an unknown instance or rebuild, a rebuild already running, "
        "no worker polling that host's queue"
    ),
    ExitCode.UNAVAILABLE: "Temporal (for `rebuild cache`: libvirt) could not be reached",
    ExitCode.ENDED_WITHOUT_RESULT: (
        "the rebuild was terminated, cancelled or timed out: no result says which disk the instance "
        "has; look at it first"
    ),
    ExitCode.INTERRUPTED: "interrupted (Ctrl-C)",
}


def table() -> str:
    """The table as shown in every command's ``--help`` (one paragraph per code) and in the README."""
    return "\n\n".join(f"{code.value}: {MEANING[code]}" for code in ExitCode)


def leave(code: int) -> NoReturn:
    """Exit without interpreter finalisation: the Temporal client can crash it (sdk-python#300)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
