"""The project's metrics, named once, recorded by the workflows (replay-safe: the meter skips replays).

Each series is labelled by the instance's ``host``, the hypervisor it is about, not by the worker that
happened to run the workflow task, and never by instance name (one series per instance would not
scale). Outcomes and steps are labels of one series each.
"""

from __future__ import annotations

from temporalio import workflow
from temporalio.common import MetricMeter

STEP_SECONDS = "rebuild_step_seconds"
DURATION_SECONDS = "rebuild_duration_seconds"
DOWNTIME_SECONDS = "rebuild_downtime_seconds"
STARTED = "rebuild_started"
FINISHED = "rebuild_finished"
DOWNLOAD_BYTES = "rebuild_image_download_bytes"
# What the exporter serves them as (``_total`` appended to counters).
COUNTERS = (STARTED, FINISHED, DOWNLOAD_BYTES)
HISTOGRAMS = (STEP_SECONDS, DURATION_SECONDS, DOWNTIME_SECONDS)
# The label the SDK's own series carry for the worker's host (``host`` is ours).
WORKER_LABEL = "worker"


def _meter(host: str) -> MetricMeter:
    return workflow.metric_meter().with_additional_attributes({"host": host})


def rebuild_started(host: str) -> None:
    _meter(host).create_counter(STARTED, "Rebuilds started").add(1)


def rebuild_finished(host: str, outcome: str, seconds: float, downtime: float | None) -> None:
    """One rebuild ended: its outcome (``rebuilt``, ``rolled_back``, ``failed_unchanged``,
    ``rollback_failed``), how long it took, and how long its instance was down, if it was."""
    meter = _meter(host)
    meter.create_counter(FINISHED, "Rebuilds finished, by outcome").add(1, {"outcome": outcome})
    meter.create_histogram_float(
        DURATION_SECONDS, "Duration of a rebuild from start to end in seconds"
    ).record(seconds, {"outcome": outcome})
    if downtime is not None:
        meter.create_histogram_float(
            DOWNTIME_SECONDS, "Seconds an instance was down during its rebuild, stop to start"
        ).record(downtime, {"outcome": outcome})


def step_finished(host: str, step: str, seconds: float) -> None:
    # Seconds, named so: the exporter's unit suffix would make "s" a "_s".
    _meter(host).create_histogram_float(STEP_SECONDS, "Duration of each rebuild step in seconds").record(
        seconds, {"step": step}
    )
