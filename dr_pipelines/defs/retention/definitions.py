"""Retention: the `apply_retention` job and its schedule."""

import dagster as dg

from dr_pipelines.core.config import DrConfig
from dr_pipelines.defs.retention.jobs import build_retention_job
from dr_pipelines.defs.schedules import Defaults, cron_schedule


def build_retention_definitions(config: DrConfig, defaults: Defaults) -> dg.Definitions:
    job = build_retention_job(config)
    return dg.Definitions(
        jobs=[job],
        schedules=[
            cron_schedule(
                f"{job.name}_schedule", job, config.schedules.retention, defaults, "Retention on every location"
            )
        ],
    )
