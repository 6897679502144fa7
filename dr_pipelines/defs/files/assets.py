"""Per file set: `files/SET/snapshot` (incremental, deduplicated, encrypted to the recipients) and
`files/SET/restore_test` (the snapshot restored into a scratch directory and compared, file by
file, with its manifest), with their checks."""

import os
from datetime import datetime, timezone

import dagster as dg

from dr_pipelines.core.config import DrConfig
from dr_pipelines.core.files import health as files_health
from dr_pipelines.core.files.catalog import load_snapshots
from dr_pipelines.core.files.format import records_owner
from dr_pipelines.core.files.restore import FileRestoreReport, test_restore_files
from dr_pipelines.core.files.snapshot import PartialSnapshot, SnapshotIndex, take_snapshot
from dr_pipelines.core.repository.records import RecordKind, load_reports, store_json_record
from dr_pipelines.defs.backup.checks import check_result
from dr_pipelines.defs.failures import domain_error, domain_failures, partial_failure
from dr_pipelines.defs.resources import DrResource


def snapshot_key(file_set: str) -> dg.AssetKey:
    return dg.AssetKey(["files", file_set, "snapshot"])


def files_restore_test_key(file_set: str) -> dg.AssetKey:
    return dg.AssetKey(["files", file_set, "restore_test"])


def snapshot_job_name(file_set: str) -> str:
    return f"files_{file_set}__snapshot_job"


def snapshot_metadata(index: SnapshotIndex, locations: list[str]) -> dict:
    """Stable keys, so the UI plots them across materializations. No file name: a secrets set's
    names never leave the manifest."""
    st = index.stats
    return {
        "snapshot_id": index.id,
        "files": st.files,
        "bytes_scanned": st.bytes_scanned,
        "bytes_new": st.bytes_new,
        "bytes_stored": st.bytes_stored,
        "dedup_ratio": st.dedup_ratio,
        "changed_files": st.changed_files + st.new_files,
        "unchanged_files": st.unchanged_files,
        "changed_while_read": st.changed_while_read,
        "skipped_unreadable": st.skipped,
        "new_packs": st.new_packs,
        "duration_s": index.duration_s,
        "locations": ", ".join(locations),
        "created_at": dg.MetadataValue.timestamp(index.created_at),
    }


def build_snapshot_asset(config: DrConfig, file_set: str) -> dg.AssetsDefinition:
    fs = config.file_sets[file_set]
    roots = "(a secrets set)" if fs.secrets else ", ".join(fs.paths)

    @dg.asset(
        key=snapshot_key(file_set),
        group_name=f"files_{file_set}",
        kinds={"files"},
        description=f"File snapshot of {roots}: FastCDC chunks, deduplicated across sets and snapshots, "
        f"zstd-compressed into packs encrypted with {config.encryption.method} to every location. The backup host "
        "holds only the recipients: it cannot read what it stored.",
        pool=f"files_{file_set}",
    )
    def snapshot(context: dg.AssetExecutionContext, dr: DrResource) -> dg.MaterializeResult:
        try:
            with domain_failures():
                cfg = dr.config()
                result = take_snapshot(cfg, file_set, dr.locations(cfg), log=context.log.info)
        except dg.Failure as failure:
            partial = domain_error(failure)
            if isinstance(partial, PartialSnapshot):
                raise partial_failure(
                    failure, "snapshot_id", partial.index.id, partial.committed, partial.failed
                ) from None
            raise
        return dg.MaterializeResult(
            metadata=snapshot_metadata(result.index, result.locations),
            data_version=dg.DataVersion(result.index.id),
        )

    return snapshot


def build_files_restore_test_asset(config: DrConfig, file_set: str) -> dg.AssetsDefinition:
    key = files_restore_test_key(file_set)

    @dg.asset(
        key=key,
        deps=[snapshot_key(file_set)],
        group_name=f"files_{file_set}",
        kinds={"files"},
        description="Restores the newest snapshot into a private scratch directory, compares every file's "
        "SHA-256 and metadata (mode, owner, times, links) with the manifest, measures the RTO, removes it. "
        "Needs the identity on the host that runs it.",
        check_specs=[
            dg.AssetCheckSpec(
                files_health.RESTORE_TEST,
                asset=key,
                blocking=True,
                description="The restored tree matched the manifest file by file.",
            )
        ],
        pool=f"files_{file_set}",
    )
    def restore_test(context: dg.AssetExecutionContext, dr: DrResource) -> dg.MaterializeResult:
        with domain_failures():
            cfg = dr.config()
            if not identity_here(cfg):  # a backup host holds only the recipients, by design
                return dg.MaterializeResult(
                    metadata={"skipped": "no readable age identity on this host"},
                    check_results=[
                        dg.AssetCheckResult(
                            check_name=files_health.RESTORE_TEST,
                            passed=False,
                            severity=dg.AssetCheckSeverity.WARN,
                            description="not tested: this host has no readable age identity (a backup host holds only "
                            "the recipients). Run files_SET__snapshot_job's restore test where the identity is "
                            "(encryption.identity_file_env), or `dr-pipelines restore-files` there",
                        )
                    ],
                )
            locations = dr.locations(cfg)
            report = test_restore_files(cfg, locations, file_set, log=context.log.info)
            report.finished_at = datetime.now(timezone.utc).isoformat()
            store_json_record(
                locations,
                records_owner(file_set),
                RecordKind.RESTORE_TEST,
                report.started_at,
                vars(report),
                context.log.info,
            )
        return dg.MaterializeResult(
            metadata=_report_metadata(report),
            check_results=[
                dg.AssetCheckResult(
                    check_name=files_health.RESTORE_TEST,
                    passed=report.passed,
                    description=report.error or f"{report.files} files restored and matched the manifest",
                )
            ],
        )

    return restore_test


def identity_here(config: DrConfig) -> bool:
    if config.encryption.method != "age":
        return True
    path = config.encryption.identity_path()
    return path is not None and os.access(path, os.R_OK)


def _report_metadata(report: FileRestoreReport) -> dict:
    return {
        "snapshot_id": report.snapshot_id,
        "passed": report.passed,
        "files": report.files,
        "bytes": report.bytes,
        "rto_s": report.rto_s,
        "locations_used": ", ".join(report.locations_used),
    }


CHECKS: dict[str, tuple[bool, str]] = {  # name -> (blocking, description)
    files_health.FRESH: (False, "The newest snapshot is younger than the set's RPO."),
    files_health.CHANGE_RATE: (
        False,
        "The newest snapshot's new bytes are within the tolerance of the rolling mean (ransomware rewrites everything).",
    ),
    files_health.REPLICATED: (False, "The newest snapshot exists on every configured location."),
    files_health.INTEGRITY: (True, "The newest snapshot's manifest and packs read back with their SHA-256 everywhere."),
    files_health.LAST_ATTEMPT: (False, "The most recent snapshot attempt succeeded."),
}


def build_snapshot_checks(config: DrConfig, file_set: str) -> list[dg.AssetChecksDefinition]:
    key = snapshot_key(file_set)

    def make(name: str, blocking: bool, description: str) -> dg.AssetChecksDefinition:
        @dg.asset_check(asset=key, name=name, blocking=blocking, description=description)
        def _check(dr: DrResource) -> dg.AssetCheckResult:
            with domain_failures():
                cfg = dr.config()
                locations = dr.locations(cfg)
                catalog = load_snapshots(locations, file_set)
                now = datetime.now(timezone.utc)
                if name == files_health.FRESH:
                    outcome = files_health.check_fresh(cfg, file_set, catalog, now)
                elif name == files_health.CHANGE_RATE:
                    outcome = files_health.check_change_rate(cfg, file_set, catalog.of(file_set))
                elif name == files_health.REPLICATED:
                    outcome = files_health.check_replicated(cfg, file_set, catalog)
                elif name == files_health.INTEGRITY:
                    outcome = files_health.check_integrity(file_set, catalog, locations)
                else:
                    attempts = load_reports(locations, records_owner(file_set), RecordKind.BACKUP_ATTEMPT)
                    outcome = files_health.check_last_attempt(file_set, [a for a in attempts if not a.running()])
            return check_result(outcome)

        return _check

    return [make(name, blocking, description) for name, (blocking, description) in CHECKS.items()]
