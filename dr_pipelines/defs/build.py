"""The one place that builds the `Definitions`, from the DR config (one deployment, a fleet of DBs).

`dr_pipelines.defs.definitions` is the module Dagster loads; the shell builds from here directly,
so that loading a config never touches the sandbox."""

import dagster as dg
from dr_pipelines.core.config import DrConfig
from dr_pipelines.core.monitoring.health import INTEGRITY, WAL_CONTINUOUS, WAL_LAG
from dr_pipelines.defs.backup.assets import (
    base_backup_key,
    build_base_backup_asset,
    build_logical_backup_asset,
    database_spec,
    logical_backup_key,
)
from dr_pipelines.defs.backup.checks import build_backup_checks, check_selection
from dr_pipelines.defs.monitoring.report import (
    COMPLIANCE_REPORT,
    build_metrics_job,
    build_report_asset,
)
from dr_pipelines.defs.monitoring.sensors import build_alert_sensors
from dr_pipelines.defs.pitr.jobs import build_pitr_job, build_pitr_test_asset
from dr_pipelines.defs.resources import DrConfigResource, storage_resources
from dr_pipelines.defs.restore.jobs import build_restore_job
from dr_pipelines.defs.restore.restore_test import (
    RECENT,
    RTO,
    build_restore_test_asset,
    build_restore_test_checks,
    restore_test_key,
)
from dr_pipelines.defs.retention.jobs import build_retention_job
from dr_pipelines.defs.wal.assets import (
    build_wal_observer,
    wal_archive_key,
    wal_archive_spec,
)
from dr_pipelines.defs.wal.checks import build_wal_checks


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
    status = _schedule_status(config)
    sensor_status = (dg.DefaultSensorStatus.RUNNING if status == dg.DefaultScheduleStatus.RUNNING
                     else dg.DefaultSensorStatus.STOPPED)
    sch = config.schedules
    retention = build_retention_job(config)
    metrics = build_metrics_job(config)
    restore_test_checks = [dg.AssetCheckKey(restore_test_key(db), name) for db in config.databases
                           for name in (RECENT, RTO)] + [dg.AssetCheckKey(wal_archive_key(db), name)
                                                         for db in config.databases for name in (WAL_CONTINUOUS, WAL_LAG)]
    health_job = dg.define_asset_job(
        "dr_health_checks", selection=check_selection(config, lambda n: n != INTEGRITY)
        | dg.AssetSelection.checks(*restore_test_checks),
        description="Freshness, size, replication, last attempt and restore-test checks of every database.")
    integrity_job = dg.define_asset_job(
        "dr_integrity_checks", selection=check_selection(config, lambda n: n == INTEGRITY),
        description="Read every object of each database's newest backup back from every location.")
    report_job = dg.define_asset_job("compliance_report_job", selection=dg.AssetSelection.assets(COMPLIANCE_REPORT),
                                     description="Build the compliance report.")
    jobs: list = [build_restore_job(config), build_pitr_job(config), retention, metrics, health_job, integrity_job,
                  report_job]
    schedules: list = [
        dg.ScheduleDefinition(name=f"{job.name}_schedule", cron_schedule=cron, target=job, execution_timezone="UTC",
                              default_status=status, description=f"{what} ({cron} UTC).")
        for job, cron, what in [(retention, sch.retention, "Retention on every location"),
                                (metrics, sch.metrics, "Prometheus export"),
                                (health_job, sch.health_checks, "Health checks"),
                                (integrity_job, sch.integrity, "Integrity read-back of the newest backups"),
                                (report_job, sch.report, "Compliance report")]]
    for db, cfg in config.databases.items():
        assets += [database_spec(config, db), build_logical_backup_asset(config, db),
                   build_restore_test_asset(config, db)]
        checks += build_restore_test_checks(config, db) + build_backup_checks(config, db) + build_wal_checks(config, db)
        assets += [build_base_backup_asset(config, db), wal_archive_spec(config, db), build_pitr_test_asset(config, db)]
        base_job = dg.define_asset_job(f"{db}__base_backup_job", selection=dg.AssetSelection.assets(base_backup_key(db)),
                                       description=f"Take a physical base backup of {db} now.")
        jobs.append(base_job)
        if cfg.base_backup.enabled:
            schedules.append(dg.ScheduleDefinition(
                name=f"{db}__base_backup_schedule", cron_schedule=cfg.base_backup.schedule, target=base_job,
                execution_timezone="UTC", default_status=status,
                description=f"Base backup of {db} ({cfg.base_backup.schedule} UTC)."))
        restore_cron = cfg.restore_test.schedule or config.schedules.restore_test
        test_job = dg.define_asset_job(restore_test_job_name(db), selection=dg.AssetSelection.assets(restore_test_key(db)),
                                       description=f"Restore the latest backup of {db} into a scratch database and validate it.")
        jobs.append(test_job)
        schedules.append(dg.ScheduleDefinition(
            name=f"{db}__restore_test_schedule", cron_schedule=restore_cron, target=test_job,
            execution_timezone="UTC", default_status=status,
            description=f"Restore test of {db} ({restore_cron} UTC), besides the one after each backup."))
        job = dg.define_asset_job(logical_backup_job_name(db), selection=dg.AssetSelection.assets(logical_backup_key(db)),
                                  description=f"Take a logical backup of {db} now.")
        jobs.append(job)
        if cfg.logical_backup.enabled:
            schedules.append(dg.ScheduleDefinition(
                name=f"{db}__logical_backup_schedule", cron_schedule=cfg.logical_backup.schedule,
                target=job, execution_timezone="UTC", default_status=status,
                description=f"Logical backup of {db} ({cfg.logical_backup.schedule} UTC).",
            ))
    assets.append(build_report_asset(config, [restore_test_key(db) for db in config.databases]))
    automation = dg.AutomationConditionSensorDefinition(
        "dr_automation", target=dg.AssetSelection.all(), default_status=sensor_status,
        description="Runs each restore test after its backup materializes (automation conditions).")
    return dg.Definitions(
        assets=assets,
        asset_checks=checks,
        jobs=jobs,
        schedules=schedules,
        sensors=[automation, *build_alert_sensors(config, sensor_status), build_wal_observer(config, sensor_status)],
        resources={"dr": DrConfigResource(config_file=config_file), **storage_resources(config)},
    )
