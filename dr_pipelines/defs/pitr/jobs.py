"""The `point_in_time_recovery` job and the `DB/pitr_test` drill asset."""

from pathlib import Path
from typing import Optional

import dagster as dg
from pydantic import Field

from dr_pipelines.core.config import DrConfig
from dr_pipelines.core.monitoring.alerts import notify
from dr_pipelines.core.monitoring.health import PITR_TEST
from dr_pipelines.core.pitr.drill import run_pitr_drill
from dr_pipelines.core.pitr.recover import (
    PitrFailed,
    PitrReport,
    PitrRequest,
    check_overwrite,
    parse_target_time,
    query_as_postgres,
    run_pitr,
)
from dr_pipelines.core.repository.records import RecordKind, store_json_record
from dr_pipelines.defs.backup.assets import base_backup_key
from dr_pipelines.defs.choices import with_choices
from dr_pipelines.defs.failures import domain_failures
from dr_pipelines.defs.resources import DrResource
from dr_pipelines.defs.wal.assets import wal_archive_key

PITR_PASSED = PITR_TEST


def pitr_test_key(db: str) -> dg.AssetKey:
    return dg.AssetKey([db, "pitr_test"])


class PitrConfig(dg.Config):
    database: str = Field(description="Which configured database to recover.")
    target_time: Optional[str] = Field(
        default=None, description="ISO 8601 with a time zone, e.g. 2026-11-23T10:15:00+00:00."
    )
    target_lsn: Optional[str] = Field(default=None, description="e.g. 0/3000060")
    target_xid: Optional[str] = Field(default=None, description="a transaction id")
    target_name: Optional[str] = Field(default=None, description="a restore point (pg_create_restore_point)")
    data_dir: str = Field(description="A NEW data directory for the recovered cluster (never a running cluster's).")
    port: int = Field(description="Port for the recovered cluster (127.0.0.1).")
    overwrite: bool = Field(default=False, description="Replace a non-empty data_dir. Needs `confirm`.")
    confirm: Optional[str] = Field(default=None, description="Type data_dir again to confirm overwriting it.")
    archive: bool = Field(default=False, description="Keep archiving WAL from the recovered cluster (new primary).")
    timeout_s: float = Field(default=600, description="How long replay may take.")
    backup_id: Optional[str] = Field(
        default=None, description="A base backup id; default: the newest before the target."
    )
    locations: Optional[list[str]] = Field(
        default=None,
        description="Recover from these locations only; default: every location that answers when recovery starts "
        "(a down one is left out, and the report says so).",
    )

    def request(self) -> PitrRequest:
        data_dir = Path(self.data_dir).expanduser().resolve()
        check_overwrite(data_dir, self.overwrite, self.confirm)
        when = parse_target_time(self.target_time) if self.target_time else None
        return PitrRequest(
            self.database,
            data_dir,
            self.port,
            target_time=when,
            target_lsn=self.target_lsn,
            target_xid=self.target_xid,
            target_name=self.target_name,
            overwrite=self.overwrite,
            archive=self.archive,
            timeout_s=self.timeout_s,
            backup_id=self.backup_id,
            locations=self.locations,
        )


def pitr_summary(report: PitrReport, databases: list[str]) -> str:
    """The run's result at a glance, as the UI shows a step's Markdown metadata."""
    rows = [
        ("recovered to", f"{report.reached_time} (LSN `{report.reached_lsn}`, timeline {report.timeline})"),
        ("asked for", report.target),
        ("why it stopped", report.stop_reason or "-"),
        ("base backup used", f"`{report.backup_id}` from {report.location}"),
        ("RTO", f"{report.rto_s or 0:.1f} s"),
        ("data-loss window", f"{report.data_loss_window_s or 0:.0f} s (from the point reached to the start)"),
        (
            "the cluster",
            f"127.0.0.1:{report.port}, data directory `{report.data_dir}`, databases {', '.join(databases)}",
        ),
        ("locations read", ", ".join(report.locations_used) or "-"),
    ]
    rows += [("left out", f"{n}: {why}") for n, why in report.left_out.items()]
    rows += [("WARNING", w) for w in report.warnings]
    return "\n".join(
        [f"### point-in-time recovery of `{report.database}`: promoted", "", "| | |", "|---|---|"]
        + [f"| {k} | {v} |" for k, v in rows]
    )


def build_pitr_job(config: DrConfig) -> dg.JobDefinition:
    Choices = with_choices(PitrConfig, database=list(config.databases))

    @dg.op(
        description="Pick the newest base backup before the target, restore it into the new directory, replay "
        "archived WAL to the target, promote; report the point reached and the RTO."
    )
    def recover_to_point(context: dg.OpExecutionContext, config: Choices, dr: DrResource) -> PitrReport:  # type: ignore[valid-type]
        with domain_failures():
            cfg = dr.config()
            locations = dr.locations(cfg)
            request = config.request()
            source = f"point_in_time_recovery run {context.run_id}"
            notify(cfg, f"PITR started: {request.database}", f"to {request.target_text}", source, context.log.info)
            try:
                report = run_pitr(cfg, dr.config_file, request, locations, log=context.log.info)
            except PitrFailed as e:
                store_json_record(
                    locations,
                    e.report.database,
                    RecordKind.PITR,
                    e.report.started_at,
                    e.report.to_dict(),
                    context.log.warning,
                )
                raise
            store_json_record(
                locations, report.database, RecordKind.PITR, report.started_at, report.to_dict(), context.log.info
            )
            notify(
                cfg,
                f"PITR finished: {request.database}",
                f"recovered to {report.reached_time} in {report.rto_s}s on port {report.port}",
                source,
                context.log.info,
            )
        context.add_output_metadata(
            {
                "backup_id": report.backup_id,
                "reached_time": report.reached_time or "",
                "reached_lsn": report.reached_lsn or "",
                "timeline": report.timeline or 0,
                "rto_s": report.rto_s,
                "data_loss_window_s": report.data_loss_window_s or 0.0,
                "port": report.port,
                "data_dir": report.data_dir,
                "locations_used": ", ".join(report.locations_used),
                "left_out": "; ".join(f"{n}: {why}" for n, why in report.left_out.items()) or "none",
            }
        )
        return report

    @dg.op(description="The recovered cluster answers queries through its own socket and is out of recovery.")
    def validate_recovered(context: dg.OpExecutionContext, report: PitrReport) -> PitrReport:
        data_dir, port = Path(report.data_dir), report.port
        in_recovery = query_as_postgres(data_dir, port, "SELECT pg_is_in_recovery()")
        dbs = (
            query_as_postgres(
                data_dir, port, "SELECT string_agg(datname, ',') FROM pg_database WHERE NOT datistemplate"
            )
            or ""
        ).split(",")
        if in_recovery != "f":
            raise dg.Failure(
                description=f"the recovered cluster on port {port} is not a promoted primary "
                f"(pg_is_in_recovery: {in_recovery!r})"
            )
        context.add_output_metadata(
            {
                "databases": ", ".join(dbs),
                "warnings": "; ".join(report.warnings),
                "summary": dg.MetadataValue.md(pitr_summary(report, dbs)),
            }
        )
        return report

    @dg.job(
        name="point_in_time_recovery",
        tags={"dr/operation": "pitr"},
        description="Point-in-time recovery into a new data directory and port (SoundHash 'Accidental data deletion').",
    )
    def point_in_time_recovery():
        validate_recovered(recover_to_point())

    return point_in_time_recovery


def build_pitr_test_asset(config: DrConfig, db: str) -> dg.AssetsDefinition:
    key = pitr_test_key(db)

    @dg.asset(
        key=key,
        deps=[base_backup_key(db), wal_archive_key(db)],
        group_name=db,
        kinds={"postgres"},
        description="PITR drill: the latest base backup plus all archived WAL recovered into a scratch "
        "directory and port, checked, timed (RTO) and removed; reports how far behind now "
        "the recovered point is (the RPO actually achievable).",
        automation_condition=dg.AutomationCondition.eager(),
        check_specs=[
            dg.AssetCheckSpec(
                PITR_PASSED,
                asset=key,
                blocking=True,
                description="The drill promoted a consistent cluster within the RTO.",
            )
        ],
    )
    def pitr_test(context: dg.AssetExecutionContext, dr: DrResource) -> dg.MaterializeResult:
        with domain_failures():
            cfg = dr.config()
            drill = run_pitr_drill(cfg, dr.config_file, db, dr.locations(cfg), context.log.info)
        report = drill.report
        return dg.MaterializeResult(
            metadata={
                "rto_s": report.rto_s or -1.0,
                "achievable_rpo_s": drill.achievable_rpo_s or -1.0,
                "backup_id": report.backup_id or "",
                "reached_time": report.reached_time or "",
                "passed": drill.passed,
            },
            check_results=[dg.AssetCheckResult(check_name=PITR_PASSED, passed=drill.passed, description=drill.why)],
        )

    return pitr_test
