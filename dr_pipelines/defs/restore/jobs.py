"""`restore_database`: the full database restore scenario (SoundHash "Database corruption",
SongNodes "Complete database loss"), as a job of ops the operator launches from the Launchpad.

choose_backup -> restore_to_staging (fetch, verify, decrypt, decompress and pg_restore in one
stream, then indexes in parallel) -> validate_restore -> stop_application -> swap_database
-> start_application -> health_checks -> restore_report

The restore goes into a staging database and is validated there, so the application is stopped
only for the swap, and a failure anywhere before the swap leaves the target untouched.
"""

import os
import shutil
import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

import dagster as dg
from pydantic import Field

from dr_pipelines.core.config import DatabaseConfig, DrConfig
from dr_pipelines.core.monitoring.alerts import notify
from dr_pipelines.core.postgres.client import connect
from dr_pipelines.core.repository.catalog import load_catalog
from dr_pipelines.core.repository.records import RecordKind
from dr_pipelines.core.restore.app_hooks import run_hooks, wait_healthy
from dr_pipelines.core.restore.fetch import Fetched
from dr_pipelines.core.restore.load import restore_into, scratch_path
from dr_pipelines.core.restore.report import (
    RestoreReport,
    describe_backup,
    store_report,
)
from dr_pipelines.core.restore.request import RestoreRequest, ValidationFailed
from dr_pipelines.core.restore.target import (
    TargetPlan,
    drop_database,
    plan_target,
    swap_in,
)
from dr_pipelines.core.restore.validation import ValidationResult, diff_table, validate_database
from dr_pipelines.core.sweep import make_scratch_dir
from dr_pipelines.defs.backup.assets import database_key
from dr_pipelines.defs.choices import with_choices
from dr_pipelines.defs.failures import domain_failures
from dr_pipelines.defs.pools import claim_pool, database_pool, free_pool
from dr_pipelines.defs.resources import DrResource


class RestoreDatabaseConfig(dg.Config):
    database: str = Field(description="Which configured database to restore (its name in the DR config).")
    backup: str = Field(
        default="latest",
        description="`latest` (falls back to the previous valid backup if the newest fails verification), "
        "a backup id (fails if that backup is unusable), or a path to a backup file on this host.",
    )
    location: Optional[str] = Field(
        default=None, description="Read only this location. Default: the first location with a valid copy."
    )
    target_database: Optional[str] = Field(
        default=None, description="Database to restore into. Default: the configured one (the source)."
    )
    clean: bool = Field(
        default=False, description="Replace an existing, non-empty target (it is kept, renamed). Needs `confirm`."
    )
    confirm: Optional[str] = Field(
        default=None, description="Type the target database's name here to confirm replacing it."
    )
    schema_only: bool = Field(default=False, description="Restore the schema only (no rows).")
    data_only: bool = Field(default=False, description="Load rows into the existing schema of the target.")
    jobs: int = Field(default=2, description="Parallel pg_restore jobs.")
    no_owner: bool = Field(default=False, description="Don't restore object ownership (pg_restore --no-owner).")
    keep_previous: bool = Field(default=True, description="Keep the replaced database, renamed *__pre_restore_*.")

    def request(self) -> RestoreRequest:
        from_file = os.sep in self.backup or self.backup.startswith("~")
        return RestoreRequest(
            database=self.database,
            backup=os.path.expanduser(self.backup),
            from_file=from_file,
            location=self.location,
            target=self.target_database,
            clean=self.clean,
            confirm=self.confirm,
            schema_only=self.schema_only,
            data_only=self.data_only,
            jobs=self.jobs,
            no_owner=self.no_owner,
            keep_previous=self.keep_previous,
        )


@dataclass(frozen=True)
class RestoreState:
    """What the ops of a restore hand to each other: decided first, then filled in step by step."""

    request: RestoreRequest
    plan: TargetPlan
    started: datetime
    t0: float
    fetched: Fetched | None = None
    steps: dict[str, float] = field(default_factory=dict)
    validation: ValidationResult | None = None
    validate_s: float = 0.0
    previous: str | None = None

    def database(self, cfg: DrConfig) -> DatabaseConfig:
        return cfg.database(self.request.database)


def _plaintext_dir(config: DrConfig, database: str, run_id: str) -> Path:
    return scratch_path(config, database, run_id)


LIVE_CLAIM = "restore_database[live database]"  # the pool claim held from stopping the application to the swap


@dg.failure_hook(required_resource_keys={"dr"})  # hooks take resources by key only
def remove_plaintext_on_failure(context: dg.HookContext) -> None:
    """Whatever step failed, no plaintext dump stays behind on this host, and the live database's
    pool is not held by a run that ended."""
    free_pool(context, LIVE_CLAIM)
    config = context.resources.dr.config()
    for db in config.databases:
        shutil.rmtree(_plaintext_dir(config, db, context.run_id), ignore_errors=True)


def restore_summary(report: RestoreReport, validation: ValidationResult, asked: str) -> str:
    """The run's result at a glance, as the UI shows a step's Markdown metadata."""
    why = (
        f"FELL BACK from the newest: {'; '.join(report.fallback_reasons)}"
        if report.fallback
        else "the newest (backup: latest)"
        if asked == "latest"
        else f"the one asked for ({asked})"
        if report.backup_id
        else "a file"
    )
    loss = f"{report.data_loss_window_s:.0f} s" if report.data_loss_window_s is not None else "unknown (no manifest)"
    lines = [
        f"### restore of `{report.database}` into `{report.target}`: PASSED",
        "",
        "| | |",
        "|---|---|",
        f"| backup used | `{report.backup_id or 'file'}` ({report.backup_created_at or '-'}) from {report.location or 'a file'} |",
        f"| why this backup | {why} |",
        f"| RTO | {report.rto_s:.1f} s |",
        f"| data-loss window | {loss} (the backup's age when the restore started) |",
        f"| validation | {validation.summary()} |",
        f"| previous database | {report.previous_database or 'none (the target was new)'} |",
    ]
    return "\n".join(lines)


def build_restore_job(config: DrConfig) -> dg.JobDefinition:
    Choices = with_choices(RestoreDatabaseConfig, database=list(config.databases))

    @dg.op(
        description="Check the request and the target (nothing is touched yet) and find the backup in the repository."
    )
    def choose_backup(context: dg.OpExecutionContext, config: Choices, dr: DrResource) -> RestoreState:  # type: ignore[valid-type]
        with domain_failures():
            cfg = dr.config()
            request = config.request()
            started = datetime.now(timezone.utc)
            plan = plan_target(cfg, request)
            if not request.from_file:
                catalog = load_catalog(dr.locations(cfg, request.location).values(), request.database, "logical")
                entry = (
                    catalog.latest(request.database)
                    if request.backup == "latest"
                    else catalog.find(request.database, request.backup)
                )
                context.log.info(
                    f"backup {entry.id} ({entry.manifest.created_at:%Y-%m-%d %H:%M:%S} UTC) "
                    f"on {', '.join(entry.locations)}"
                )
            notify(
                cfg,
                f"restore started: {request.database}",
                f"backup {request.backup} into {plan.target!r}",
                f"restore_database run {context.run_id}",
                context.log.info,
            )
        return RestoreState(request, plan, started, time.time())

    @dg.op(
        description="Fetch the backup, verify its SHA-256, decrypt and decompress it into a private 0700 "
        "directory while parallel pg_restore loaders load it into a staging database (dropped if the "
        "copy proves corrupt), then build indexes with pg_restore -j (data_only: only a verified copy, "
        "into the target, after stopping the application). With restore_spool off, or too little free space, one "
        "stream feeds pg_restore instead and only the archive's head touches disk. For `latest`, an "
        "unusable backup falls back to the previous one. The plaintext is removed afterwards, even "
        "on failure."
    )
    def restore_to_staging(context: dg.OpExecutionContext, state: RestoreState, dr: DrResource) -> RestoreState:
        cfg = dr.config()
        request, plan, db = state.request, state.plan, state.database(cfg)
        workdir = _plaintext_dir(cfg, request.database, context.run_id)
        make_scratch_dir(workdir)
        try:
            with domain_failures():
                if plan.staging is None and plan.is_source:
                    # data_only loads into the live database: never beside a backup of it (nor another restore)
                    claim_pool(context, database_pool(request.database), LIVE_CLAIM)
                if plan.staging is None:  # data_only: rows go straight into the live target
                    run_hooks(db.application.stop, db.application, "stop application", context.log.info)
                fetched, steps = restore_into(
                    cfg,
                    dr.locations(cfg, request.location),
                    request,
                    db,
                    plan.staging or plan.target,
                    workdir,
                    plan.staging is not None,
                    context.log.info,
                )
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        if fetched.fallback_reasons:
            context.log.warning(
                f"FALLBACK: the newest backup could not be used ({'; '.join(fetched.fallback_reasons)}); "
                f"restored {fetched.manifest.id} instead"
            )
        context.add_output_metadata(
            {
                "backup_id": fetched.manifest.id if fetched.manifest else request.backup,
                "fallback": bool(fetched.fallback_reasons),
                **steps,
            }
        )
        return replace(state, fetched=fetched, steps=steps)

    @dg.op(
        description="Row counts and schema against the manifest, the database's own validation queries, and "
        "amcheck on indexes. A failure leaves the target untouched."
    )
    def validate_restore(context: dg.OpExecutionContext, state: RestoreState, dr: DrResource) -> RestoreState:
        cfg = dr.config()
        request, plan, db = state.request, state.plan, state.database(cfg)
        assert state.fetched is not None
        into = plan.staging or plan.target
        t = time.time()
        with domain_failures(), connect(db, request.database, dbname=into, autocommit=True) as conn:
            result = validate_database(
                conn,
                state.fetched.manifest,
                db.validation,
                compare_rows=not request.schema_only,
                compare_schema=not request.data_only,
            )
        context.add_output_metadata(
            {
                "tables": result.tables,
                "rows": result.rows,
                "passed": result.passed,
                "checks": dg.MetadataValue.json(result.checks),
            }
        )
        if not result.passed:
            if plan.staging:
                drop_database(db, request.database, plan.staging)
            raise dg.Failure(
                description=ValidationFailed(result).args[0]
                + (f" The target {plan.target!r} was not touched." if plan.staging else ""),
                metadata={"table_diff": dg.MetadataValue.md(diff_table(result.table_diffs))}
                if result.table_diffs
                else {},
            )
        context.log.info(result.summary())
        return replace(state, validation=result, validate_s=round(time.time() - t, 3))

    @dg.op(description="Run the configured stop hooks (commands / HTTP calls).")
    def stop_application(context: dg.OpExecutionContext, state: RestoreState, dr: DrResource) -> RestoreState:
        if state.plan.staging is None:
            return state  # data_only stopped it before loading rows
        db = state.database(dr.config())
        if state.plan.is_source:
            # the live database is replaced next: first wait for a backup (or another restore) of it to
            # end, so the application is not left stopped while it runs; held until the swap is done
            claim_pool(context, database_pool(state.request.database), LIVE_CLAIM)
        with domain_failures():
            run_hooks(db.application.stop, db.application, "stop application", context.log.info)
        return state

    @dg.op(
        description="Swap the validated staging database into the target's place; the replaced database is "
        "kept, renamed, unless keep_previous is false."
    )
    def swap_database(context: dg.OpExecutionContext, state: RestoreState, dr: DrResource) -> RestoreState:
        previous = None
        if state.plan.staging is not None:
            with domain_failures():
                previous = swap_in(
                    state.database(dr.config()),
                    state.request.database,
                    state.plan,
                    state.request.keep_previous,
                    context.log.info,
                )
        free_pool(context, LIVE_CLAIM)  # the live database is in place: backups of it may run
        return replace(state, previous=previous)

    @dg.op(description="Run the configured start hooks.")
    def start_application(context: dg.OpExecutionContext, state: RestoreState, dr: DrResource) -> RestoreState:
        db = state.database(dr.config())
        with domain_failures():
            run_hooks(db.application.start, db.application, "start application", context.log.info)
        return state

    @dg.op(description="The configured health checks, retried until they pass.")
    def health_checks(context: dg.OpExecutionContext, state: RestoreState, dr: DrResource) -> RestoreState:
        db = state.database(dr.config())
        with domain_failures():
            wait_healthy(db.application, context.log.info)
        return state

    @dg.op(
        description="Measured RTO, the data-loss window, the backup used (and why, on fallback); stored in the "
        "repository and as run metadata."
    )
    def restore_report(context: dg.OpExecutionContext, state: RestoreState, dr: DrResource) -> RestoreReport:
        request, started = state.request, state.started
        assert state.fetched is not None and state.validation is not None
        report = RestoreReport(
            kind=RecordKind.RESTORE,
            database=request.database,
            target=state.plan.target,
            started_at=started.isoformat(),
            finished_at=datetime.now(timezone.utc).isoformat(),
        )
        describe_backup(report, state.fetched, started)
        report.previous_database = state.previous
        report.validation = state.validation.to_dict()
        report.steps_s = {**state.steps, "validate": state.validate_s}
        report.rto_s = round(time.time() - state.t0, 3)
        report.passed = True
        stored = store_report(dr.locations(), report, context.log.info)
        metadata = {
            "backup_id": report.backup_id or request.backup,  # a file without its manifest
            "rto_s": report.rto_s,
            "data_loss_window_s": report.data_loss_window_s if report.data_loss_window_s is not None else -1.0,
            "fallback": report.fallback,
            "target": report.target,
            "tables": state.validation.tables,
            "rows": state.validation.rows,
            "report_stored_on": ", ".join(stored),
        }
        if report.previous_database:
            metadata["previous_database"] = report.previous_database
        if report.fallback:
            metadata["fallback_reasons"] = dg.MetadataValue.md("\n".join(f"- {r}" for r in report.fallback_reasons))
        metadata["summary"] = dg.MetadataValue.md(restore_summary(report, state.validation, request.backup))
        context.add_output_metadata(metadata)
        context.log_event(
            dg.AssetObservation(
                asset_key=database_key(request.database),
                metadata={"restored_from": report.backup_id or "file", "rto_s": report.rto_s},
            )
        )
        done = (
            f"restore of {request.database} into {report.target} done: backup {report.backup_id}, "
            f"RTO {report.rto_s:.1f}s, data-loss window {report.data_loss_window_s}s"
            + (" (FALLBACK)" if report.fallback else "")
        )
        context.log.info(done)
        notify(
            dr.config(),
            f"restore finished: {request.database}",
            done,
            f"restore_database run {context.run_id}",
            context.log.info,
        )
        return report

    @dg.job(
        name="restore_database",
        description="Full database restore from a logical backup: choose -> fetch + verify + decrypt + decompress + "
        "pg_restore into staging (streamed) -> validate -> stop app -> swap -> start app -> health "
        "checks -> report.",
        executor_def=dg.in_process_executor,
        hooks={remove_plaintext_on_failure},
        tags={"dr/operation": "restore"},
    )
    def restore_database():
        restore_report(
            health_checks(
                start_application(
                    swap_database(stop_application(validate_restore(restore_to_staging(choose_backup()))))
                )
            )
        )

    return restore_database
