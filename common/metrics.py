"""Prometheus metrics as Prometheus expects them: counters end in ``_total``, durations are seconds,
histogram buckets fit what they measure, and every series names the host it comes from.

The SDK's runtime serves them (its own metrics and the project's, created through the workflow's and
activities' metric meters); this module only configures it.
"""

from __future__ import annotations

from temporalio.runtime import PrometheusConfig, Runtime, TelemetryConfig

# A rebuild step takes from ~10 ms (prepare: one rename) to hours (a large image on a slow link, or a
# confirm window); the buckets cover both ends so that neither lands in the first or the last bucket.
STEP_BUCKETS_SECONDS: tuple[float, ...] = (
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400, 43200,
)  # fmt: skip

# The project's own metrics, as created in code (the exporter appends ``_total`` to counters).
STEP_SECONDS = "rebuild_step_seconds"
REBUILD_SECONDS = "rebuild_seconds"
COUNTERS = (
    "rebuilds_started",
    "rebuilds_finished",
    "rebuilds_rolled_back",
    "rebuilds_failed_unchanged",
    "rebuilds_rollback_failed",
    "image_download_bytes",
)


def prometheus_runtime(bind_address: str, host: str | None = None) -> Runtime:
    """A runtime that serves ``/metrics`` at ``bind_address``, every series labelled ``host``."""
    return Runtime(
        telemetry=TelemetryConfig(
            global_tags={"host": host} if host else {},
            metrics=PrometheusConfig(
                bind_address=bind_address,
                counters_total_suffix=True,
                unit_suffix=True,
                durations_as_seconds=True,
                histogram_bucket_overrides={
                    STEP_SECONDS: STEP_BUCKETS_SECONDS,
                    REBUILD_SECONDS: STEP_BUCKETS_SECONDS,
                },
            ),
        )
    )
