"""WAL continuity, archive lag and integrity (every archived file read back) checks."""

import dagster as dg

from dr_pipelines.core.config import DrConfig
from dr_pipelines.core.monitoring.health import WAL_CONTINUOUS, WAL_INTEGRITY, WAL_LAG, check_wal, check_wal_integrity
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
        build_wal_integrity_check(db),
    ]


def build_wal_integrity_check(db: str) -> dg.AssetChecksDefinition:
    @dg.asset_check(
        asset=wal_archive_key(db),
        name=WAL_INTEGRITY,
        description="Every archived WAL file since the oldest retained base backup reads back from every "
        "location with its SHA-256 (a corrupt segment found now, not by the recovery).",
    )
    def _check(dr: DrResource) -> dg.AssetCheckResult:
        with domain_failures():
            cfg = dr.config()
            locations = dr.locations(cfg)
            since = current_wal_status(cfg, db, locations).oldest_base_start
            return check_result(check_wal_integrity(locations, db, since))

    return _check
