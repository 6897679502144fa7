"""Asset checks on `DB/logical_backup`, computed from the repository by `core.health`.

Which are blocking, and why:
  - integrity is BLOCKING: it runs right after each backup; an object that cannot be read back with
    its checksum is not a backup, so the run fails (and the run-failure alert fires) instead of
    leaving a green run over an unrestorable copy, and nothing downstream in the run proceeds.
  - freshness, replication and last-attempt are not blocking: they describe the repository over
    time (they are evaluated by the `dr_health_checks` schedule, not only after a backup), and
    the failed-check sensor alerts on them.
  - size anomaly is a WARNING and not blocking: purges and bulk loads change sizes legitimately;
    a person decides, the backup itself is fine.
"""

from collections.abc import Callable
from datetime import datetime, timezone

import dagster as dg

from dr_pipelines.core.config import DrConfig
from dr_pipelines.core.monitoring import health
from dr_pipelines.core.repository.catalog import load_catalog
from dr_pipelines.core.repository.records import RecordKind, load_reports
from dr_pipelines.defs.backup.assets import logical_backup_key
from dr_pipelines.defs.failures import domain_failures
from dr_pipelines.defs.resources import DrResource

SEVERITY = {health.ERROR: dg.AssetCheckSeverity.ERROR, health.WARNING: dg.AssetCheckSeverity.WARN}


def check_result(outcome: health.Outcome) -> dg.AssetCheckResult:
    md = {}
    for k, v in outcome.metadata.items():
        md[k] = dg.MetadataValue.md(v) if k.endswith("_table") else v
    return dg.AssetCheckResult(
        passed=outcome.passed, severity=SEVERITY[outcome.severity], description=outcome.description, metadata=md
    )


def _evaluate(kind: str, cfg: DrConfig, db: str, locations) -> health.Outcome:
    catalog = load_catalog(locations.values(), db, "logical")
    if kind == health.FRESHNESS:
        return health.check_freshness(cfg, db, catalog, datetime.now(timezone.utc))
    if kind == health.SIZE:
        tests = load_reports(locations, db, RecordKind.RESTORE_TEST)
        return health.check_size(cfg, db, catalog, health.failed_restore_tests(tests))
    if kind == health.REPLICATION:
        return health.check_replication(cfg, db, catalog)
    if kind == health.INTEGRITY:
        return health.check_integrity(cfg, db, catalog, locations)
    if kind == health.LAST_ATTEMPT:
        return health.check_last_attempt(db, load_reports(locations, db, RecordKind.BACKUP_ATTEMPT))
    if kind == health.SECONDARY_LAG:
        return health.check_secondaries(cfg, locations, f"database {db}", datetime.now(timezone.utc))
    raise ValueError(kind)


CHECKS: dict[str, tuple[bool, str]] = {  # name -> (blocking, description)
    health.FRESHNESS: (False, "The newest backup in the repository is younger than the database's limit."),
    health.SIZE: (False, "The newest backup's size is within the tolerance of the rolling mean of recent good ones."),
    health.REPLICATION: (False, "The newest backup exists on every configured location."),
    health.INTEGRITY: (True, "Every object of the newest backup reads back from every location with its SHA-256."),
    health.LAST_ATTEMPT: (False, "The most recent backup attempt succeeded."),
    health.SECONDARY_LAG: (
        False,
        "Every secondary location is behind the first by less than the RPO (backups and WAL): a failover to it "
        "would lose no more than the objective.",
    ),
}


def build_backup_checks(config: DrConfig, db: str) -> list[dg.AssetChecksDefinition]:
    key = logical_backup_key(db)

    def make(name: str, blocking: bool, description: str) -> dg.AssetChecksDefinition:
        @dg.asset_check(asset=key, name=name, blocking=blocking, description=description)
        def _check(dr: DrResource) -> dg.AssetCheckResult:
            with domain_failures():
                cfg = dr.config()
                outcome = _evaluate(name, cfg, db, dr.locations(cfg))
            return check_result(outcome)

        return _check

    return [make(name, blocking, description) for name, (blocking, description) in CHECKS.items()]


def check_selection(config: DrConfig, include: Callable[[str], bool]) -> dg.AssetSelection:
    return dg.AssetSelection.checks(
        *[dg.AssetCheckKey(logical_backup_key(db), name) for db in config.databases for name in CHECKS if include(name)]
    )
