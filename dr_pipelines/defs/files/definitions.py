"""File sets: per set the snapshot and its restore test (one job, on the set's schedule), their
checks, and the `restore_files` job."""

import dagster as dg

from dr_pipelines.core.config import DrConfig
from dr_pipelines.core.files.health import INTEGRITY
from dr_pipelines.defs.files.assets import (
    build_files_restore_test_asset,
    build_snapshot_asset,
    build_snapshot_checks,
    files_restore_test_key,
    snapshot_job_name,
    snapshot_key,
)
from dr_pipelines.defs.files.jobs import build_restore_files_job
from dr_pipelines.defs.schedules import Defaults, cron_schedule


def build_files_definitions(config: DrConfig, defaults: Defaults) -> dg.Definitions:
    assets: list = []
    checks: list = []
    jobs: list = [build_restore_files_job(config)] if config.file_sets else []
    schedules: list = []
    for name, fs in config.file_sets.items():
        assets += [build_snapshot_asset(config, name), build_files_restore_test_asset(config, name)]
        checks += build_snapshot_checks(config, name)
        job = dg.define_asset_job(
            snapshot_job_name(name),
            # the restore test follows every snapshot in the same run: each snapshot proven restorable
            # (the integrity read-back of every pack is the daily dr_integrity_checks' job: here a snapshot's new
            # packs are read back as they are written, and the restore test reads every pack it uses)
            selection=dg.AssetSelection.assets(snapshot_key(name), files_restore_test_key(name))
            - dg.AssetSelection.checks(dg.AssetCheckKey(snapshot_key(name), INTEGRITY)),
            description=f"Snapshot file set {name} now, then restore-test it.",
        )
        jobs.append(job)
        if fs.enabled:
            schedules.append(
                cron_schedule(
                    f"files_{name}__snapshot_schedule", job, fs.schedule, defaults, f"File snapshot of {name}"
                )
            )
    return dg.Definitions(assets=assets, asset_checks=checks, jobs=jobs, schedules=schedules)
