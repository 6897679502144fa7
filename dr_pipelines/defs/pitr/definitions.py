"""Point-in-time recovery: the `point_in_time_recovery` job and a PITR drill asset per database."""

import dagster as dg

from dr_pipelines.core.config import DrConfig
from dr_pipelines.defs.pitr.jobs import build_pitr_job, build_pitr_test_asset
from dr_pipelines.defs.schedules import Defaults


def build_pitr_definitions(config: DrConfig, defaults: Defaults) -> dg.Definitions:
    return dg.Definitions(
        assets=[build_pitr_test_asset(config, db) for db in config.databases], jobs=[build_pitr_job(config)]
    )
