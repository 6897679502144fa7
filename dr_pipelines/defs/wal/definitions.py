"""WAL archives: observed assets with continuity and lag checks, and the observer sensor."""

import dagster as dg

from dr_pipelines.core.config import DrConfig
from dr_pipelines.defs.schedules import Defaults
from dr_pipelines.defs.wal.assets import build_wal_observer, wal_archive_spec
from dr_pipelines.defs.wal.checks import build_wal_checks


def build_wal_definitions(config: DrConfig, defaults: Defaults) -> dg.Definitions:
    return dg.Definitions(
        assets=[wal_archive_spec(config, db) for db in config.databases],
        asset_checks=[c for db in config.databases for c in build_wal_checks(config, db)],
        sensors=[build_wal_observer(config, defaults.observing().sensor)],
    )
