"""Whole-system recovery: the scenario jobs and the weekly full-system drill."""

import dagster as dg

from dr_pipelines.core.config import DrConfig
from dr_pipelines.defs.recovery.jobs import build_recovery_jobs
from dr_pipelines.defs.schedules import Defaults, cron_schedule


def build_recovery_definitions(config: DrConfig, defaults: Defaults) -> dg.Definitions:
    jobs = build_recovery_jobs(config)
    schedules = []
    if config.recovery.drill_enabled:
        drill = next(j for j in jobs if j.name == "full_system_drill")
        schedules.append(
            cron_schedule(
                "full_system_drill_schedule",
                drill,
                config.recovery.drill_schedule,
                defaults,
                "The whole system restored into scratch targets, timed and removed",
            )
        )
    return dg.Definitions(jobs=jobs, schedules=schedules)
