"""Fleet-wide monitoring: the compliance report asset and the Prometheus export job."""

from datetime import datetime, timezone

import dagster as dg
from pydantic import Field

from dr_pipelines.core.config import DrConfig
from dr_pipelines.core.monitoring.health import evaluate
from dr_pipelines.core.monitoring.metrics import build_registry, export
from dr_pipelines.defs.failures import domain_failures
from dr_pipelines.defs.resources import DrResource

COMPLIANCE_REPORT = dg.AssetKey(["dr", "compliance_report"])


class ReportConfig(dg.Config):
    days: int = Field(default=30, ge=1, description="How many days the report covers.")


def build_report_asset(config: DrConfig, upstream: list[dg.AssetKey]) -> dg.AssetsDefinition:
    @dg.asset(
        key=COMPLIANCE_REPORT,
        deps=upstream,
        group_name="dr",
        kinds={"pandas"},
        description="Compliance report over every database: backup success rate, RPO actually achieved, "
        "RTO from restore tests against the objective, storage per location, recommendations. "
        "JSON, HTML and Markdown copies are stored in the repository under compliance/.",
    )
    def compliance_report(config: ReportConfig, dr: DrResource) -> dg.MaterializeResult:
        with domain_failures():
            cfg = dr.config()
            locations = dr.locations(cfg)
            from dr_pipelines.core.monitoring.report import (  # pandas: loaded only here
                build_report,
                store_report,
            )

            report = build_report(cfg, evaluate(cfg, locations, datetime.now(timezone.utc)), config.days)
            stored = store_report(locations, report)
        s = report.summary

        def summary(column: str, how: str) -> float:
            values = s[column].dropna()
            return float(getattr(values, how)()) if len(values) else 0.0

        return dg.MaterializeResult(
            metadata={
                "report": dg.MetadataValue.md(report.to_markdown()),
                "days": config.days,
                "success_rate_pct_min": summary("success_rate_pct", "min"),
                "rpo_achieved_s_max": summary("rpo_achieved_s", "max"),
                "rto_max_s": summary("rto_max_s", "max"),
                "recommendations": len(report.recommendations),
                "stored": dg.MetadataValue.json({k: v for k, v in stored.items()}),
            }
        )

    return compliance_report


def build_metrics_job(config: DrConfig) -> dg.JobDefinition:
    @dg.op(description="Evaluate backup health from the repository; write the Prometheus textfile and push.")
    def write_metrics(context: dg.OpExecutionContext, dr: DrResource) -> None:
        with domain_failures():
            cfg = dr.config()
            h = evaluate(cfg, dr.locations(cfg), datetime.now(timezone.utc))
            done = export(cfg, build_registry(cfg, h))
        context.add_output_metadata(
            {"exported_to": ", ".join(done) or "nowhere (metrics not configured)", "status": h.worst}
        )

    @dg.job(
        name="export_metrics",
        description="Prometheus metrics: node-exporter textfile and Pushgateway.",
        tags={"dr/operation": "metrics"},
    )
    def export_metrics_job():
        write_metrics()

    return export_metrics_job
