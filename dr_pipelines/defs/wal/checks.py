"""WAL continuity and archive lag checks."""

import dagster as dg

from dr_pipelines.core.config import DrConfig
from dr_pipelines.core.monitoring.health import WAL_CONTINUOUS, WAL_LAG, check_wal
from dr_pipelines.defs.backup.checks import check_result
from dr_pipelines.defs.failures import domain_failures
from dr_pipelines.defs.resources import DrResource
from dr_pipelines.defs.wal.assets import current_wal_status, wal_archive_key


def build_wal_checks(config: DrConfig, db: str) -> list[dg.AssetChecksDefinition]:
    """Continuity and lag, computed by core.health (the same verdict as `status` and the metrics)."""

    def make(name: str, description: str) -> dg.AssetChecksDefinition:
        @dg.asset_check(asset=wal_archive_key(db), name=name, description=description)
        def _check(dr: DrResource) -> dg.AssetCheckResult:
            with domain_failures():
                cfg = dr.config()
                outcomes = check_wal(cfg, current_wal_status(cfg, db, dr.locations(cfg)))
            return check_result(next(o for o in outcomes if o.check == name))

        return _check

    rpo = config.database(db).objectives.rpo.total_seconds()
    return [
        make(
            WAL_CONTINUOUS, "Every WAL segment from the oldest retained base backup's start to the newest is archived."
        ),
        make(WAL_LAG, f"WAL is archived within the RPO ({rpo:.0f} s)."),
    ]
