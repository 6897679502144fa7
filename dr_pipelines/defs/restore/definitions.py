"""Restores: the `restore_database` job, and per database the restore test with its checks and schedule."""

import dagster as dg

from dr_pipelines.core.config import DrConfig
from dr_pipelines.defs.pools import database_run_tags
from dr_pipelines.defs.restore.jobs import build_restore_job
from dr_pipelines.defs.restore.restore_test import (
    build_restore_test_asset,
    build_restore_test_checks,
    restore_test_job_name,
    restore_test_key,
)
from dr_pipelines.defs.schedules import Defaults, cron_schedule


def build_restore_definitions(config: DrConfig, defaults: Defaults) -> dg.Definitions:
    assets: list = []
    checks: list = []
    jobs: list = [build_restore_job(config)]
    schedules: list = []
    for db, cfg in config.databases.items():
        assets.append(build_restore_test_asset(config, db))
        checks += build_restore_test_checks(config, db)
        job = dg.define_asset_job(
            restore_test_job_name(db),
            selection=dg.AssetSelection.assets(restore_test_key(db)),
            description=f"Restore the latest backup of {db} into a scratch database and validate it.",
            tags=database_run_tags(db, "restore_test"),
        )
        jobs.append(job)
        cron = cfg.restore_test.schedule or config.schedules.restore_test
        schedules.append(
            cron_schedule(
                f"{db}__restore_test_schedule",
                job,
                cron,
                defaults,
                f"Restore test of {db}, besides the one after each backup",
            )
        )
    return dg.Definitions(assets=assets, asset_checks=checks, jobs=jobs, schedules=schedules)
