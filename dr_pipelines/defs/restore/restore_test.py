"""`DB/restore_test`: every new backup restored into a scratch database and proven against its manifest."""

from datetime import datetime, timezone

import dagster as dg
from pydantic import Field

from dr_pipelines.core.config import DrConfig
from dr_pipelines.core.monitoring import health
from dr_pipelines.core.repository.records import RecordKind, load_reports
from dr_pipelines.core.restore.restore_test import run_restore_test
from dr_pipelines.core.restore.validation import TableDiff, diff_table
from dr_pipelines.defs.backup.assets import logical_backup_key
from dr_pipelines.defs.backup.checks import check_result
from dr_pipelines.defs.failures import domain_failures
from dr_pipelines.defs.pools import database_pool
from dr_pipelines.defs.resources import DrResource

PASSED = health.RESTORE_TEST


RECENT = health.RESTORE_TEST_RECENT


RTO = health.RTO


def restore_test_key(db: str) -> dg.AssetKey:
    return dg.AssetKey([db, "restore_test"])


class RestoreTestRunConfig(dg.Config):
    backup: str = Field(default="latest", description="`latest` or a backup id.")
    keep: bool = Field(default=False, description="Keep the scratch database for inspection.")


def build_restore_test_asset(config: DrConfig, db: str) -> dg.AssetsDefinition:
    key = restore_test_key(db)
    cfg = config.databases[db]

    @dg.asset(
        key=key,
        deps=[logical_backup_key(db)],
        group_name=db,
        kinds={"postgres"},
        description=f"Restores the latest logical backup of `{cfg.dbname}` into a scratch database on the test "
        "server, compares row counts and schema with the manifest, runs the validation queries and "
        "amcheck, measures the RTO and drops the scratch database.",
        automation_condition=dg.AutomationCondition.eager(),  # after every new backup
        # Blocking: a backup that cannot be proven restorable must fail the run and alert.
        check_specs=[
            dg.AssetCheckSpec(
                PASSED,
                asset=key,
                blocking=True,
                description="The restored database matched the manifest and passed every check.",
            )
        ],
        pool=database_pool(db),
    )
    def restore_test(
        context: dg.AssetExecutionContext, config: RestoreTestRunConfig, dr: DrResource
    ) -> dg.MaterializeResult:
        with domain_failures():
            run_config = dr.config()
            report = run_restore_test(
                run_config, db, dr.locations(run_config), backup=config.backup, keep=config.keep, log=context.log.info
            )
        validation = report.validation or {}
        metadata = {
            "backup_id": report.backup_id,
            "passed": report.passed,
            "rto_s": report.rto_s,
            "data_loss_window_s": report.data_loss_window_s,
            "tables": validation.get("tables", 0),
            "rows": validation.get("rows", 0),
            "fallback": report.fallback,
            "scratch_database": report.target,
        }
        check_md: dict[str, dg.MetadataValue] = {"checks": dg.MetadataValue.json(validation.get("checks", {}))}
        diffs = [TableDiff(**d) for d in validation.get("table_diffs", [])]
        if diffs:
            check_md["table_diff"] = dg.MetadataValue.md(diff_table(diffs))
        return dg.MaterializeResult(
            metadata=metadata,
            check_results=[
                dg.AssetCheckResult(
                    check_name=PASSED,
                    passed=report.passed,
                    metadata=check_md,
                    description=report.error or "restored and validated",
                )
            ],
        )

    return restore_test


def build_restore_test_checks(config: DrConfig, db: str) -> list[dg.AssetChecksDefinition]:
    """Computed from the restore-test reports in the repository, by the same code as `status` and
    the metrics, so a restore test run from the shell counts too and the verdicts never disagree."""
    key = restore_test_key(db)
    cfg = config.databases[db]

    def make(name: str, description: str) -> dg.AssetChecksDefinition:
        @dg.asset_check(asset=key, name=name, description=description)
        def _check(dr: DrResource) -> dg.AssetCheckResult:
            with domain_failures():
                run_config = dr.config()
                tests = load_reports(dr.locations(run_config), db, RecordKind.RESTORE_TEST)
                outcomes = health.check_restore_tests(run_config, db, tests, datetime.now(timezone.utc))
            return check_result(next(o for o in outcomes if o.check == name))

        return _check

    return [
        make(RECENT, f"A restore test ran within the last {cfg.restore_test.max_age}."),
        make(RTO, f"The measured restore time is within the RTO ({cfg.objectives.rto})."),
    ]


def restore_test_job_name(db: str) -> str:
    return f"{db}__restore_test_job"
