"""Prometheus metrics as Prometheus expects them: one ``rebuild_`` prefix, counters ending in
``_total``, outcomes and steps as labels, durations in seconds with buckets that fit them.

Every project series carries ``host``: the hypervisor whose instance it is about, whichever worker
ran the workflow task that counted it. The SDK's own series carry ``worker``, the worker's host: a
global tag cannot be ``host`` too (the exporter would print the label twice). The SDK's runtime
serves both; this module only names and configures them.
"""

from __future__ import annotations

from temporalio.runtime import PrometheusConfig, Runtime, TelemetryConfig

from workflows.metrics import DOWNTIME_SECONDS, DURATION_SECONDS, STEP_SECONDS, WORKER_LABEL

# A rebuild step takes from ~10 ms (prepare: one rename) to hours (a large image on a slow link, or a
# confirm window); the buckets cover both ends so that neither lands in the first or the last bucket.
STEP_BUCKETS_SECONDS: tuple[float, ...] = (
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400, 43200,
)  # fmt: skip
# An instance is down from a fraction of a second (the swap) to a graceful stop's minutes.
DOWNTIME_BUCKETS_SECONDS: tuple[float, ...] = (
    0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800,
)  # fmt: skip


def prometheus_runtime(bind_address: str, host: str | None = None) -> Runtime:
    """A runtime that serves ``/metrics`` at ``bind_address``, the SDK's series labelled ``worker``."""
    return Runtime(
        telemetry=TelemetryConfig(
            global_tags={WORKER_LABEL: host} if host else {},
            metrics=PrometheusConfig(
                bind_address=bind_address,
                counters_total_suffix=True,
                unit_suffix=True,
                durations_as_seconds=True,
                histogram_bucket_overrides={
                    STEP_SECONDS: STEP_BUCKETS_SECONDS,
                    DURATION_SECONDS: STEP_BUCKETS_SECONDS,
                    DOWNTIME_SECONDS: DOWNTIME_BUCKETS_SECONDS,
                },
            ),
        )
    )
