"""The one place that builds the `Definitions`, from the DR config (one deployment, a fleet of DBs).

`dr_pipelines.defs.definitions` is the module Dagster loads; the shell builds from here directly,
so that loading a config never touches the sandbox."""


import dagster as dg

from dr_pipelines.core.config import DrConfig
from dr_pipelines.defs.logical_backup import build_logical_backup_asset, database_spec, logical_backup_key
from dr_pipelines.defs.resources import DrConfigResource, storage_resources
from dr_pipelines.defs.restore import build_restore_job
from dr_pipelines.defs.retention import build_retention_job
from dr_pipelines.defs.restore_test import build_restore_test_asset, build_restore_test_checks, restore_test_key


def logical_backup_job_name(db: str) -> str:
    return f"{db}__logical_backup_job"


def restore_test_job_name(db: str) -> str:
    return f"{db}__restore_test_job"


def _schedule_status(config: DrConfig) -> dg.DefaultScheduleStatus:
    running = config.schedules.running
    if running is None:
        running = not config.sandbox
    return dg.DefaultScheduleStatus.RUNNING if running else dg.DefaultScheduleStatus.STOPPED


def build_definitions(config: DrConfig, config_file: str | None = None) -> dg.Definitions:
    assets: list = []
    checks: list = []
    retention = build_retention_job(config)
    jobs: list = [build_restore_job(config), retention]
    status = _schedule_status(config)
    schedules: list = [dg.ScheduleDefinition(
        name="apply_retention_schedule", cron_schedule=config.schedules.retention, target=retention,
        execution_timezone="UTC", default_status=status,
        description=f"Retention on every location ({config.schedules.retention} UTC).")]
    for db, cfg in config.databases.items():
        assets += [database_spec(config, db), build_logical_backup_asset(config, db),
                   build_restore_test_asset(config, db)]
        checks += build_restore_test_checks(config, db)
        test_job = dg.define_asset_job(restore_test_job_name(db), selection=dg.AssetSelection.assets(restore_test_key(db)),
                                       description=f"Restore the latest backup of {db} into a scratch database and validate it.")
        jobs.append(test_job)
        schedules.append(dg.ScheduleDefinition(
            name=f"{db}__restore_test_schedule", cron_schedule=cfg.restore_test.schedule, target=test_job,
            execution_timezone="UTC", default_status=status,
            description=f"Restore test of {db} ({cfg.restore_test.schedule} UTC), besides the one after each backup."))
        job = dg.define_asset_job(logical_backup_job_name(db), selection=dg.AssetSelection.assets(logical_backup_key(db)),
                                  description=f"Take a logical backup of {db} now.")
        jobs.append(job)
        if cfg.logical_backup.enabled:
            schedules.append(dg.ScheduleDefinition(
                name=f"{db}__logical_backup_schedule", cron_schedule=cfg.logical_backup.schedule,
                target=job, execution_timezone="UTC", default_status=status,
                description=f"Logical backup of {db} ({cfg.logical_backup.schedule} UTC).",
            ))
    automation = dg.AutomationConditionSensorDefinition(
        "dr_automation", target=dg.AssetSelection.all(), default_status=(
            dg.DefaultSensorStatus.RUNNING if status == dg.DefaultScheduleStatus.RUNNING else dg.DefaultSensorStatus.STOPPED),
        description="Runs each restore test after its backup materializes (automation conditions).")
    return dg.Definitions(
        assets=assets,
        asset_checks=checks,
        jobs=jobs,
        schedules=schedules,
        sensors=[automation],
        resources={"dr": DrConfigResource(config_file=config_file), **storage_resources(config)},
    )

