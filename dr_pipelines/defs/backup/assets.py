"""Per configured database: the database itself (external), `DB/logical_backup` (pg_dump) and
`DB/base_backup` (pg_basebackup), each streamed to every location."""

from datetime import datetime, timedelta, timezone
from typing import Optional

import dagster as dg
from pydantic import Field

from dr_pipelines.core.backup.attempts import PartialBackup
from dr_pipelines.core.backup.base import run_base_backup
from dr_pipelines.core.backup.logical import run_logical_backup
from dr_pipelines.core.config import DrConfig
from dr_pipelines.defs.failures import domain_error, domain_failures, partial_failure
from dr_pipelines.defs.pools import database_pool
from dr_pipelines.defs.resources import DrResource


class BackupRunConfig(dg.Config):
    label: Optional[str] = Field(
        default=None,
        description="A name for this backup (e.g. pre-migration): shown in the lists, and a restore can pick it by it.",
    )


def database_key(db: str) -> dg.AssetKey:
    return dg.AssetKey([db, "database"])


def logical_backup_key(db: str) -> dg.AssetKey:
    return dg.AssetKey([db, "logical_backup"])


def database_spec(config: DrConfig, db: str) -> dg.AssetSpec:
    """The database itself, as an external asset, so lineage reads database -> backups."""
    cfg = config.databases[db]
    return dg.AssetSpec(
        key=database_key(db),
        description=f"PostgreSQL database `{cfg.dbname}` at {cfg.host}:{cfg.port} (not managed by Dagster).",
        group_name=db,
        kinds={"postgres"},
        metadata={"host": cfg.host, "port": cfg.port, "dbname": cfg.dbname},
    )


def backup_metadata(manifest, locations: list[str], ratio: float) -> dict:
    """Stable keys, so the UI plots them across materializations."""
    return {
        "backup_id": manifest.id,
        "size_bytes": manifest.size_bytes,
        "uncompressed_bytes": manifest.uncompressed_bytes,
        "duration_s": manifest.duration_s,
        "compression_ratio": ratio,
        "sha256": manifest.objects[0].sha256,
        "locations": ", ".join(locations),
        "tables": len(manifest.tables),
        "rows": sum(manifest.tables.values()),
        "created_at": dg.MetadataValue.timestamp(manifest.created_at),
        "label": manifest.label or "",
    }


def build_logical_backup_asset(config: DrConfig, db: str) -> dg.AssetsDefinition:
    cfg = config.databases[db]

    @dg.asset(
        key=logical_backup_key(db),
        deps=[database_key(db)],
        group_name=db,
        kinds={"postgres"},
        description=(
            f"Logical backup of `{cfg.dbname}`: `pg_dump -Fc` streamed through "
            f"{config.compression.method} and {config.encryption.method} encryption to "
            f"{', '.join(config.locations)}. The repository's manifest is the source of truth."
        ),
        pool=database_pool(db),
        # Dagster's own freshness (its daemon, from materializations); the `backup_fresh` check
        # reads the repository, so it also sees backups taken from the shell.
        freshness_policy=dg.FreshnessPolicy.time_window(  # Dagster's floor is one minute
            fail_window=max(cfg.freshness_limit(datetime.now(timezone.utc)), timedelta(minutes=1))
        ),
    )
    def logical_backup(
        context: dg.AssetExecutionContext, config: BackupRunConfig, dr: DrResource
    ) -> dg.MaterializeResult:
        try:
            with domain_failures():
                run_config = dr.config()
                result = run_logical_backup(
                    run_config, db, dr.locations(run_config), log=context.log.info, label=config.label or None
                )
        except dg.Failure as failure:
            partial = domain_error(failure)
            if isinstance(partial, PartialBackup):  # say which copies exist and which don't
                raise partial_failure(
                    failure, "backup_id", partial.manifest.id, partial.committed, partial.failed
                ) from None
            raise
        return dg.MaterializeResult(
            metadata=backup_metadata(result.manifest, result.locations, result.compression_ratio),
            data_version=dg.DataVersion(result.manifest.id),
        )

    return logical_backup


def base_backup_key(db: str) -> dg.AssetKey:
    return dg.AssetKey([db, "base_backup"])


def build_base_backup_asset(config: DrConfig, db: str) -> dg.AssetsDefinition:
    @dg.asset(
        key=base_backup_key(db),
        deps=[database_key(db)],
        group_name=db,
        kinds={"postgres"},
        description=f"Physical base backup of {db}: `pg_basebackup -Ft` streamed through "
        f"{config.compression.method} and {config.encryption.method} encryption to every location, "
        "PostgreSQL's backup_manifest inside; complete only once its WAL is archived.",
        pool=database_pool(db),
    )
    def base_backup(context: dg.AssetExecutionContext, config: BackupRunConfig, dr: DrResource) -> dg.MaterializeResult:
        with domain_failures():
            cfg = dr.config()
            result = run_base_backup(cfg, db, dr.locations(cfg), log=context.log.info, label=config.label or None)
        m, facts = result.manifest, result.manifest.base
        return dg.MaterializeResult(
            metadata={
                "backup_id": m.id,
                "size_bytes": m.size_bytes,
                "uncompressed_bytes": m.uncompressed_bytes,
                "duration_s": m.duration_s,
                "compression_ratio": result.compression_ratio,
                "sha256": m.objects[0].sha256,
                "locations": ", ".join(result.locations),
                "start_lsn": facts.start_lsn,
                "stop_lsn": facts.stop_lsn,
                "timeline": facts.timeline,
                "wal_start": facts.wal_start,
                "wal_stop": facts.wal_stop,
                "created_at": dg.MetadataValue.timestamp(m.created_at),
            },
            data_version=dg.DataVersion(m.id),
        )

    return base_backup


def logical_backup_job_name(db: str) -> str:
    return f"{db}__logical_backup_job"


def base_backup_job_name(db: str) -> str:
    return f"{db}__base_backup_job"
