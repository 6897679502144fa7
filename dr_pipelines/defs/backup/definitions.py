"""Backups of every configured database: assets, checks, the jobs that take one now, schedules."""

import dagster as dg

from dr_pipelines.core.config import DrConfig
from dr_pipelines.defs.backup.assets import (
    base_backup_job_name,
    base_backup_key,
    build_base_backup_asset,
    build_logical_backup_asset,
    database_spec,
    logical_backup_job_name,
    logical_backup_key,
)
from dr_pipelines.defs.backup.checks import build_backup_checks
from dr_pipelines.defs.pools import database_run_tags
from dr_pipelines.defs.schedules import Defaults, cron_schedule

BACKUP_RUN_RETRIES = 2


def build_backup_definitions(config: DrConfig, defaults: Defaults) -> dg.Definitions:
    assets: list = []
    checks: list = []
    jobs: list = []
    schedules: list = []
    for db, cfg in config.databases.items():
        assets += [
            database_spec(config, db),
            build_logical_backup_asset(config, db),
            build_base_backup_asset(config, db),
        ]
        checks += build_backup_checks(config, db)
        for kind, name, key, when in (
            ("logical", logical_backup_job_name(db), logical_backup_key(db), cfg.logical_backup),
            ("base", base_backup_job_name(db), base_backup_key(db), cfg.base_backup),
        ):
            what = "logical" if kind == "logical" else "physical base"
            job = dg.define_asset_job(
                name,
                selection=dg.AssetSelection.assets(key),
                description=f"Take a {what} backup of {db} now.",
                # a failed backup is run again (twice) by the instance's run retries; a restore never is
                tags=database_run_tags(db, "backup", retries=BACKUP_RUN_RETRIES),
            )
            jobs.append(job)
            if when.enabled:
                schedules.append(
                    cron_schedule(
                        f"{db}__{kind}_backup_schedule",
                        job,
                        when.schedule,
                        defaults,
                        f"{what.capitalize()} backup of {db}",
                    )
                )
    return dg.Definitions(assets=assets, asset_checks=checks, jobs=jobs, schedules=schedules)
