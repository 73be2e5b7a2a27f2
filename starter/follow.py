"""Following a running rebuild for a person: ``rebuild start --wait`` (on stderr) and ``rebuild watch``.

Every phase is printed once, in order, as the workflow entered it: the status query keeps the list,
so a phase entered and left between two polls is not missed. While the image downloads, its bytes,
size, speed and ETA; while the instance stops, what is left of its graceful window. On a terminal
that is one live line; elsewhere (a pipe, a log) a plain line every few seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import textwrap
import time
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

from rich.console import Console, RenderableType
from rich.filesize import decimal
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from temporalio.client import WorkflowHandle, WorkflowQueryFailedError
from temporalio.service import RPCError

from starter.rebuilds import DownloadProgress, RebuildDescription, query_status
from workflows.models import Phase, RebuildStatus

POLL_SECONDS = 0.5
# How often a plain (not a terminal) follower repeats the download's or the stop's line, at most.
PLAIN_EVERY_SECONDS = 2.0
# The speed is measured between two samples this far apart at least (else since the fetch began).
SPEED_BASELINE_SECONDS = 1.5
BAR_WIDTH = 24
QUERY_SECONDS = 5.0


def phase_line(status: RebuildStatus, index: int) -> str:
    """``phase: fetch (+1.2 s)``: the phase and when it was entered, counted from the rebuild's start."""
    entered = status.phases[index]
    line = f"  phase: {entered.phase.value}"
    if status.started_at is not None:
        line += f" (+{(entered.at - status.started_at).total_seconds():.1f} s)"
    return line


def download_figures(download: DownloadProgress) -> str:
    """``9.2/16.8 MB 55%, 1.1 MB/s, 0:00:07 left``: what a download has done, how fast, how long to go."""
    done, total = download.done_bytes, download.total_bytes
    if total:
        size, unit = decimal(total).split()
        scale = total / float(size) if float(size) else 1.0
        shown = f"{done / scale:.1f}/{size} {unit} {100 * done // total}%"
    else:
        shown = f"{decimal(done)} (size unknown)"
    speed, left = download.bytes_per_second, download.seconds_left
    shown += f", {decimal(int(speed))}/s" if speed else ", speed ?"
    if left is not None:
        shown += f", {timedelta(seconds=round(left))} left"
    return shown


def stop_figures(status: RebuildStatus, now: datetime) -> str | None:
    """What is left of the graceful shutdown's window before the instance is forced off."""
    deadline = status.graceful_stop_deadline
    if deadline is None:
        return None
    left = (deadline - now).total_seconds()
    if left <= 0:
        return "graceful window over: forcing it off"
    return f"waiting for the guest to shut down, {left:.0f} s left before it is forced off"


def wrapped(label: str, items: list[str], width: int) -> list[str]:
    """``label: a, b, c`` over as many lines as ``width`` needs, never cut."""
    return textwrap.wrap(
        ", ".join(items), width=max(width, 40), initial_indent=f"  {label}: ", subsequent_indent="    "
    )


def step_lines(step_seconds: dict[str, float], width: int) -> list[str]:
    return wrapped("steps", [f"{step} {seconds:.2f}s" for step, seconds in step_seconds.items()], width)


def notes(described: RebuildDescription) -> list[str]:
    """A step's retries and a host without a worker: said once each, as they appear."""
    said = [
        f"  {p.activity}: attempt {p.attempt}, last error: {p.last_error}"
        for p in described.pending_activities
        if p.attempt > 1 and p.last_error
    ]
    if described.waiting_for_worker:
        said.append(f"  {described.waiting_for_worker}")
    return said


class Follower:
    """Prints what a rebuild does to one console, from its descriptions, as they come."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.live = console.is_terminal
        self._phases_shown = 0
        self._phase_without_list: Phase | None = None
        self._notes_shown: set[str] = set()
        self._last_plain: tuple[Phase, float] | None = None
        self._last_line: str | None = None
        self._first_sample: DownloadProgress | None = None
        self._display: Live | None = None

    @contextlib.contextmanager
    def showing(self) -> Iterator[Follower]:
        """The live line, while following on a terminal; it goes away at the end (the lines stay)."""
        if not self.live:
            yield self
            return
        with Live(console=self.console, transient=True, refresh_per_second=4) as display:
            self._display = display
            try:
                yield self
            finally:
                self._display = None

    def show(self, described: RebuildDescription) -> None:
        status = described.status
        # An ended rebuild's status comes from Temporal's record, without the phase list.
        if status is not None and (status.phases or described.workflow_status == "RUNNING"):
            self.phases(status)
        for note in notes(described):
            if note not in self._notes_shown:
                self._notes_shown.add(note)
                self._print(note)
        current = self._current_line(described)
        if self._display is not None:
            self._display.update(current or "")
        elif isinstance(current, str) and status is not None:
            self._plain(status.phase, current)

    @property
    def followed(self) -> bool:
        """Whether it saw the rebuild run (a watch of one long over has nothing more to ask)."""
        return self._phases_shown > 0 or self._phase_without_list is not None

    def phases(self, status: RebuildStatus) -> None:
        """The phases entered since the last call: each once, in order."""
        if not status.phases:
            # A worker from before the phase list: its current phase, when it changed.
            if self._phases_shown == 0 and status.phase not in (Phase.PENDING, self._phase_without_list):
                self._phase_without_list = status.phase
                self._print(f"  phase: {status.phase.value}")
            return
        for index in range(self._phases_shown, len(status.phases)):
            self._print(phase_line(status, index))
        self._phases_shown = max(self._phases_shown, len(status.phases))

    def _current_line(self, described: RebuildDescription) -> RenderableType | None:
        status = described.status
        if status is None:
            return None
        if status.phase == Phase.FETCH and described.download is not None:
            download = self._measured(described.download)
            figures = download_figures(download)
            if self._display is None or not download.total_bytes:
                return f"  fetch: {figures}"
            row = Table.grid(padding=(0, 1))
            row.add_row(
                "  fetch:",
                ProgressBar(
                    total=download.total_bytes,
                    completed=download.done_bytes,
                    width=min(BAR_WIDTH, max(self.console.width - len(figures) - 12, 5)),
                ),
                figures,
            )
            return row
        if status.phase == Phase.STOP:
            window = stop_figures(status, datetime.now(UTC))
            return f"  stop: {window}" if window else None
        return None

    def _measured(self, download: DownloadProgress) -> DownloadProgress:
        """The download, its speed measured from the first sample seen once that is old enough."""
        first = self._first_sample
        if first is None or download.done_bytes < first.done_bytes:
            self._first_sample = download
            return download
        if (download.sampled_at - first.sampled_at).total_seconds() < SPEED_BASELINE_SECONDS:
            return download
        return download.measured_since(first)

    def _plain(self, phase: Phase, line: str) -> None:
        """A plain follower's line when it says something new, at most every few seconds in a phase."""
        now = time.monotonic()
        if self._last_plain is not None:
            phase_before, printed_at = self._last_plain
            quiet = line == self._last_line or now - printed_at < PLAIN_EVERY_SECONDS
            if phase_before == phase and quiet:
                return
        self._last_plain, self._last_line = (phase, now), line
        self._print(line)

    def _print(self, line: str) -> None:
        self.console.print(line, markup=False, highlight=False, soft_wrap=not self.live)


async def follow(
    follower: Follower,
    describe: Callable[[], Awaitable[RebuildDescription]],
    ended: Callable[[RebuildDescription], bool],
) -> RebuildDescription:
    """Describe the rebuild every half second and show it, until ``ended`` says so; the last one."""
    while True:
        try:
            described = await describe()
        except (RPCError, TimeoutError):
            # Temporal busy or a query slow: the next poll catches up, the phase list misses nothing.
            await asyncio.sleep(POLL_SECONDS)
            continue
        follower.show(described)
        if ended(described):
            return described
        await asyncio.sleep(POLL_SECONDS)


async def show_last_phases(follower: Follower, handle: WorkflowHandle[Any, Any]) -> None:
    """The phases entered after the last poll, from the ended workflow's own status (one query)."""
    with contextlib.suppress(RPCError, TimeoutError, WorkflowQueryFailedError):
        follower.phases(await asyncio.wait_for(query_status(handle), QUERY_SECONDS))
