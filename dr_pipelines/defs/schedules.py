"""How every domain declares its schedules: UTC cron, default status from the config."""

from dataclasses import dataclass
from typing import Any

import dagster as dg

from dr_pipelines.core.config import DrConfig


@dataclass(frozen=True)
class Defaults:
    """Whether schedules and sensors start RUNNING (outside the sandbox, unless `schedules.running` says)."""

    schedule: dg.DefaultScheduleStatus
    sensor: dg.DefaultSensorStatus

    @classmethod
    def of(cls, config: DrConfig) -> "Defaults":
        running = config.schedules.running
        if running is None:
            running = not config.sandbox
        return cls(
            dg.DefaultScheduleStatus.RUNNING if running else dg.DefaultScheduleStatus.STOPPED,
            dg.DefaultSensorStatus.RUNNING if running else dg.DefaultSensorStatus.STOPPED,
        )


def cron_schedule(name: str, job: Any, cron: str, defaults: Defaults, what: str) -> dg.ScheduleDefinition:
    return dg.ScheduleDefinition(
        name=name,
        cron_schedule=cron,
        target=job,
        execution_timezone="UTC",
        default_status=defaults.schedule,
        description=f"{what} ({cron} UTC).",
    )
