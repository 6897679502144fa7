"""`apply_retention`: the retention plan (a table in the run's metadata), then the removals."""

from datetime import datetime, timedelta, timezone

import dagster as dg
from pydantic import Field

from dr_pipelines.core.config import DrConfig
from dr_pipelines.core.retention import apply_plan, build_plan, plan_table
from dr_pipelines.defs.failures import domain_failures
from dr_pipelines.defs.resources import DrResource

RUN_HISTORY_BATCH = 1000  # per run: the next scheduled run deletes the next batch


class RetentionRunConfig(dg.Config):
    dry_run: bool = Field(default=False, description="Only print the plan; remove nothing.")


def build_retention_job(config: DrConfig) -> dg.JobDefinition:
    @dg.op(
        description="Plan grandfather-father-son retention over every location (min_keep floor, pins, the "
        "newest restore-tested backup kept), then remove the rest: manifest first, then objects."
    )
    def plan_and_apply_retention(context: dg.OpExecutionContext, config: RetentionRunConfig, dr: DrResource) -> bool:
        with domain_failures():
            cfg = dr.config()
            locations = dr.locations(cfg)
            plan = build_plan(cfg, locations, datetime.now(timezone.utc))
        for p in plan.problems:
            context.log.warning(p)
        metadata = {
            "plan": dg.MetadataValue.md(plan_table(plan.decisions)),
            "backups": len(plan.decisions),
            "removed": 0 if config.dry_run else len(plan.removed),
            "would_remove": len(plan.removed),
            "dry_run": config.dry_run,
            "wal_files_to_remove": len(plan.wal),
            "snapshots_to_remove": len(plan.files.removed) if plan.files else 0,
            "packs_to_free": len(plan.files.packs) if plan.files else 0,
            "bytes_to_free": plan.files.bytes_freed if plan.files else 0,
        }
        if plan.files and plan.files.decisions:
            metadata["snapshot_plan"] = dg.MetadataValue.md(plan_table(plan.files.decisions))
        if config.dry_run:
            context.add_output_metadata(metadata)
            return False
        outcome = apply_plan(cfg, locations, plan, log=context.log.info)
        context.add_output_metadata(
            {**metadata, "moved_to_colder_class": len([m for m in outcome.moves if not m.error])}
        )
        if not outcome.complete:
            raise dg.Failure(
                description="retention incomplete: "
                + "; ".join(outcome.failures + plan.problems)
                + ". Fix the location and run apply_retention again; nothing kept was touched."
            )
        return True

    @dg.op(
        description="After the retention plan was applied (not on a dry run): delete Dagster's records of "
        "finished runs older than retention.run_history_days, a batch per run; what happened stays in the "
        "repository's reports and the compliance report."
    )
    def prune_run_history(context: dg.OpExecutionContext, applied: bool, dr: DrResource) -> None:
        if not applied:
            context.log.info("dry run: no run history deleted")
            return
        days = dr.config().retention.run_history_days
        if not days:
            context.log.info("run history kept: retention.run_history_days is not set")
            return
        cutoff = datetime.now(timezone.utc) - timedelta(days=days)
        finished = [dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED]
        old = context.instance.get_run_records(
            filters=dg.RunsFilter(statuses=finished, created_before=cutoff), limit=RUN_HISTORY_BATCH
        )
        for record in old:
            context.instance.delete_run(record.dagster_run.run_id)
        context.add_output_metadata({"runs_deleted": len(old), "created_before": cutoff.isoformat(timespec="seconds")})

    @dg.job(
        name="apply_retention",
        description="Apply the retention policy to every location (dry_run to preview).",
        tags={"dr/operation": "retention"},
    )
    def apply_retention_job():
        prune_run_history(plan_and_apply_retention())

    return apply_retention_job
