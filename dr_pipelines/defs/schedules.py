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
    # what only looks (the WAL observer, the health checks): also RUNNING in the sandbox, so its lineage
    # shows checks evaluated, not a green tick for checks never run
    observe_schedule: dg.DefaultScheduleStatus = dg.DefaultScheduleStatus.STOPPED
    observe_sensor: dg.DefaultSensorStatus = dg.DefaultSensorStatus.STOPPED

    @classmethod
    def of(cls, config: DrConfig) -> "Defaults":
        running = config.schedules.running
        if running is None:
            running = not config.sandbox
        observe = running or config.sandbox
        return cls(
            dg.DefaultScheduleStatus.RUNNING if running else dg.DefaultScheduleStatus.STOPPED,
            dg.DefaultSensorStatus.RUNNING if running else dg.DefaultSensorStatus.STOPPED,
            dg.DefaultScheduleStatus.RUNNING if observe else dg.DefaultScheduleStatus.STOPPED,
            dg.DefaultSensorStatus.RUNNING if observe else dg.DefaultSensorStatus.STOPPED,
        )

    def observing(self) -> "Defaults":
        """The defaults for what only looks."""
        return Defaults(self.observe_schedule, self.observe_sensor, self.observe_schedule, self.observe_sensor)


def cron_schedule(name: str, job: Any, cron: str, defaults: Defaults, what: str) -> dg.ScheduleDefinition:
    return dg.ScheduleDefinition(
        name=name,
        cron_schedule=cron,
        target=job,
        execution_timezone="UTC",
        default_status=defaults.schedule,
        description=f"{what} ({cron} UTC).",
    )
