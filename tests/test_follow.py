"""What a follower (``start --wait``, ``watch``) prints, from the descriptions a rebuild gives, as text."""

from __future__ import annotations

import io
from datetime import UTC, datetime, timedelta

from rich.console import Console

from starter.follow import Follower, download_figures, step_lines, stop_figures
from starter.rebuilds import DownloadProgress, RebuildDescription
from workflows.models import Phase, PhaseEntered, RebuildStatus

T0 = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)


def status(phase: Phase, entered: list[Phase], **more: object) -> RebuildStatus:
    phases = [PhaseEntered(phase=p, at=T0 + timedelta(seconds=i)) for i, p in enumerate(entered)]
    return RebuildStatus.model_validate(
        {"instance": "vm-1", "host": "h", "phase": phase, "image_url": None, "started_at": T0}
        | {"phases": phases}
        | more
    )


def described(state: RebuildStatus, running: bool = True, **more: object) -> RebuildDescription:
    return RebuildDescription.model_validate(
        {"workflow_id": "w", "workflow_status": "RUNNING" if running else "COMPLETED", "status": state} | more
    )


def plain() -> tuple[Follower, io.StringIO]:
    out = io.StringIO()
    return Follower(Console(file=out, width=80, force_terminal=False)), out


def test_phases_entered_between_two_polls_are_each_printed_once_in_order() -> None:
    follower, out = plain()
    follower.show(described(status(Phase.INSPECT, [Phase.INSPECT])))
    follower.show(described(status(Phase.STOP, [Phase.INSPECT, Phase.FETCH, Phase.CHECK, Phase.STOP])))
    follower.show(described(status(Phase.STOP, [Phase.INSPECT, Phase.FETCH, Phase.CHECK, Phase.STOP])))
    follower.show(described(status(Phase.DONE, []), running=False))  # Temporal's record: no list
    assert out.getvalue().splitlines() == [
        "  phase: inspect (+0.0 s)",
        "  phase: fetch (+1.0 s)",
        "  phase: check (+2.0 s)",
        "  phase: stop (+3.0 s)",
    ]


def test_a_worker_from_before_the_phase_list_still_shows_its_phase_as_it_changes() -> None:
    follower, out = plain()
    for phase in (Phase.PENDING, Phase.FETCH, Phase.FETCH, Phase.STOP):
        follower.show(described(status(phase, [])))
    assert out.getvalue().splitlines() == ["  phase: fetch", "  phase: stop"]
    assert follower.followed


def test_the_download_shows_size_speed_and_eta_in_the_total_s_unit() -> None:
    download = DownloadProgress(
        done_bytes=917_504, total_bytes=4_194_304, started_at=T0, sampled_at=T0 + timedelta(seconds=2)
    )
    assert download_figures(download) == "0.9/4.2 MB 21%, 458.8 kB/s, 0:00:07 left"
    later = download.model_copy(update={"done_bytes": 2_917_504, "sampled_at": T0 + timedelta(seconds=4)})
    assert later.measured_since(download).bytes_per_second == 1_000_000
    unknown = download.model_copy(update={"total_bytes": None})
    assert download_figures(unknown) == "917.5 kB (size unknown), 458.8 kB/s"


def test_no_download_line_before_the_fetch_and_the_stop_s_window_during_the_stop() -> None:
    follower, out = plain()
    sample = DownloadProgress(done_bytes=1, total_bytes=2, started_at=T0, sampled_at=T0)
    follower.show(described(status(Phase.INSPECT, [Phase.INSPECT]), download=sample.model_dump()))
    deadline = datetime.now(UTC) + timedelta(seconds=30.4)
    follower.show(described(status(Phase.STOP, [Phase.INSPECT, Phase.STOP], graceful_stop_deadline=deadline)))
    lines = out.getvalue().splitlines()
    assert not any(line.startswith("  fetch:") for line in lines)
    assert lines[-1] == "  stop: waiting for the guest to shut down, 30 s left before it is forced off"
    over = status(Phase.STOP, [], graceful_stop_deadline=T0)
    assert stop_figures(over, T0 + timedelta(seconds=1)) == "graceful window over: forcing it off"


def test_the_step_list_wraps_at_80_columns_and_loses_nothing() -> None:
    steps = {name: 12.345 for name in ("inspect", "fetch", "check", "stage", "stop", "prepare", "start")}
    steps |= {"verify": 1.0, "confirm-window": 900.0, "cleanup": 0.25}
    lines = step_lines(steps, 80)
    assert len(lines) > 1 and all(len(line) <= 80 for line in lines)
    joined = " ".join(line.strip() for line in lines)
    assert all(f"{name} " in joined for name in steps) and joined.startswith("steps: inspect 12.35s")
