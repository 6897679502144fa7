"""Fleet-wide monitoring: the health and integrity check jobs, the compliance report, the Prometheus
export, the alert sensors and the automation sensor that runs restore tests after backups."""

import dagster as dg

from dr_pipelines.core.config import DrConfig
from dr_pipelines.core.files.health import INTEGRITY as FILE_INTEGRITY
from dr_pipelines.core.monitoring.health import INTEGRITY, WAL_CONTINUOUS, WAL_INTEGRITY, WAL_LAG
from dr_pipelines.defs.backup.checks import check_selection
from dr_pipelines.defs.dead_runs import build_dead_run_sensor
from dr_pipelines.defs.files.assets import CHECKS as FILE_CHECKS
from dr_pipelines.defs.files.assets import snapshot_key
from dr_pipelines.defs.monitoring.report import COMPLIANCE_REPORT, build_metrics_job, build_report_asset
from dr_pipelines.defs.monitoring.sensors import build_alert_sensors
from dr_pipelines.defs.restore.restore_test import RECENT, RTO, restore_test_key
from dr_pipelines.defs.schedules import Defaults, cron_schedule
from dr_pipelines.defs.wal.assets import wal_archive_key


def build_monitoring_definitions(config: DrConfig, defaults: Defaults) -> dg.Definitions:
    sch = config.schedules
    repository_checks = [
        dg.AssetCheckKey(restore_test_key(db), name) for db in config.databases for name in (RECENT, RTO)
    ]
    repository_checks += [
        dg.AssetCheckKey(wal_archive_key(db), name) for db in config.databases for name in (WAL_CONTINUOUS, WAL_LAG)
    ]
    file_checks = [
        dg.AssetCheckKey(snapshot_key(s), n) for s in config.file_sets for n in FILE_CHECKS if n != FILE_INTEGRITY
    ]
    file_integrity = [dg.AssetCheckKey(snapshot_key(s), FILE_INTEGRITY) for s in config.file_sets]
    health_job = dg.define_asset_job(
        "dr_health_checks",
        selection=check_selection(config, lambda n: n != INTEGRITY)
        | dg.AssetSelection.checks(*repository_checks, *file_checks),
        description="Freshness, size, replication, last attempt and restore-test checks of every database.",
    )
    integrity_job = dg.define_asset_job(
        "dr_integrity_checks",
        selection=check_selection(config, lambda n: n == INTEGRITY)
        | dg.AssetSelection.checks(
            *[dg.AssetCheckKey(wal_archive_key(db), WAL_INTEGRITY) for db in config.databases], *file_integrity
        ),
        description="Read every object of each database's newest backup, and its archived WAL, back from every "
        "location.",
    )
    report_job = dg.define_asset_job(
        "compliance_report_job",
        selection=dg.AssetSelection.assets(COMPLIANCE_REPORT),
        description="Build the compliance report.",
    )
    metrics_job = build_metrics_job(config)
    schedules = [
        cron_schedule(f"{job.name}_schedule", job, cron, defaults.observing(), "Health checks")
        for job, cron in [(health_job, sch.health_checks)]
    ] + [
        cron_schedule(f"{job.name}_schedule", job, cron, defaults, what)
        for job, cron, what in [
            (metrics_job, sch.metrics, "Prometheus export"),
            (integrity_job, sch.integrity, "Integrity read-back of the newest backups"),
            (report_job, sch.report, "Compliance report"),
        ]
    ]
    automation = dg.AutomationConditionSensorDefinition(
        "dr_automation",
        target=dg.AssetSelection.all(),
        default_status=defaults.sensor,
        description="Runs each restore test after its backup materializes (automation conditions).",
    )
    return dg.Definitions(
        assets=[build_report_asset(config, [restore_test_key(db) for db in config.databases])],
        jobs=[health_job, integrity_job, report_job, metrics_job],
        schedules=schedules,
        sensors=[
            automation,
            *build_alert_sensors(config, defaults.sensor),
            build_dead_run_sensor(sch.sensor_interval_s, defaults.observing().sensor),
        ],
    )
