"""The one place that builds the `Definitions`, from the DR config (one deployment, a fleet of DBs)."""


import os

import dagster as dg

from dr_pipelines.core.config import CONFIG_ENV, DrConfig, load_config
from dr_pipelines.defs.logical_backup import build_logical_backup_asset, database_spec, logical_backup_key
from dr_pipelines.defs.resources import DrConfigResource, storage_resources


def logical_backup_job_name(db: str) -> str:
    return f"{db}__logical_backup_job"


def _schedule_status(config: DrConfig) -> dg.DefaultScheduleStatus:
    running = config.schedules.running
    if running is None:
        running = not config.sandbox
    return dg.DefaultScheduleStatus.RUNNING if running else dg.DefaultScheduleStatus.STOPPED


def build_definitions(config: DrConfig, config_file: str | None = None) -> dg.Definitions:
    assets: list = []
    jobs: list = []
    schedules: list = []
    for db, cfg in config.databases.items():
        assets += [database_spec(config, db), build_logical_backup_asset(config, db)]
        job = dg.define_asset_job(logical_backup_job_name(db), selection=dg.AssetSelection.assets(logical_backup_key(db)),
                                  description=f"Take a logical backup of {db} now.")
        jobs.append(job)
        if cfg.logical_backup.enabled:
            schedules.append(dg.ScheduleDefinition(
                name=f"{db}__logical_backup_schedule", cron_schedule=cfg.logical_backup.schedule,
                target=job, execution_timezone="UTC", default_status=_schedule_status(config),
                description=f"Logical backup of {db} ({cfg.logical_backup.schedule} UTC).",
            ))
    return dg.Definitions(
        assets=assets,
        jobs=jobs,
        schedules=schedules,
        resources={"dr": DrConfigResource(config_file=config_file), **storage_resources(config)},
    )


def _load() -> dg.Definitions:
    config_file = os.environ.get(CONFIG_ENV) or None
    return build_definitions(load_config(config_file), config_file)


defs = _load()
