"""The alert sensors: failed runs, failed asset checks (OSS Dagster has no alert for them), and
backups that stopped arriving. Each keeps its incidents in its cursor (`IncidentBook`): one alert
per incident, a resolved notice when it clears, delivery retried on later ticks if a channel is down."""

import time
from datetime import datetime, timedelta, timezone
from urllib.parse import quote

import dagster as dg

from dr_pipelines.core.config import DrConfig
from dr_pipelines.core.monitoring import health
from dr_pipelines.core.monitoring.alerts import (
    Alert,
    IncidentBook,
    channels_from_config,
)
from dr_pipelines.core.monitoring.health import check_freshness
from dr_pipelines.core.repository.catalog import load_catalog
from dr_pipelines.defs.resources import DrResource
from dr_pipelines.defs.restore.restore_test import PASSED as RESTORE_TEST_PASSED

RUN_FAILURES = "dr_run_failure_alerts"


CHECK_FAILURES = "dr_check_failure_alerts"


STALENESS = "dr_staleness_alerts"


FIRST_LOOK_BACK = timedelta(days=1)


# One alert per incident: these checks' failures already alert through another sensor.
ALERTED_ELSEWHERE = {
    health.FRESHNESS: "the staleness sensor",
    health.INTEGRITY: "the run-failure sensor (blocking: its failure fails the run)",
    RESTORE_TEST_PASSED: "the run-failure sensor (blocking)",
}  # a new sensor reports failures of the last day, not all history


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="seconds")


def ui_url(config: DrConfig, path: str) -> str:
    return config.webserver_url.rstrip("/") + path


def deliver_alerts(context, config: DrConfig, book: IncidentBook) -> str:
    """Deliver what is pending; a channel that is down never crashes the sensor (retried next tick).
    Returns what the tick says of it (open incidents, all clear, or what failed)."""
    channels, broken = channels_from_config(config)
    for problem in broken:  # e.g. its env var is missing: the other channels still deliver
        context.log.error(f"alert channel not usable: {problem}")
    errors = book.deliver(channels, context.log.info, expected=list(config.alerts)) + broken
    open_now = sorted(book.open_keys())
    if errors:
        return "delivery failed, will retry: " + "; ".join(errors)
    return f"open incidents: {', '.join(open_now)}" if open_now else "all clear"


def _finish(context, config: DrConfig, book: IncidentBook) -> dg.SensorResult:
    skip = deliver_alerts(context, config, book)  # first: the cursor records what was delivered
    return dg.SensorResult(cursor=book.to_json(), skip_reason=skip)


def _run_subject(run: dg.DagsterRun) -> str:
    """Runs that materialize assets are keyed by their assets, so a failed automatic restore test
    is resolved by a later success of the same assets, whichever job ran them."""
    if run.asset_selection:
        return "assets " + ", ".join(sorted(k.to_user_string() for k in run.asset_selection))
    return f"job {run.job_name}"


def _failure_detail(instance: dg.DagsterInstance, run_id: str) -> str:
    for record in instance.get_records_for_run(run_id, of_type=dg.DagsterEventType.STEP_FAILURE).records:
        event = record.event_log_entry.dagster_event
        data = event.step_failure_data if event else None
        if data and data.error:
            desc = data.user_failure_data.description if data.user_failure_data else None
            return f"step {event.step_key}: {desc or data.error.message.strip()}"
    for record in instance.get_records_for_run(run_id, of_type=dg.DagsterEventType.RUN_FAILURE).records:
        if record.event_log_entry.message:  # e.g. its process died, or it never started
            return record.event_log_entry.message
    return "the run failed before any step failed (see the run's logs)"


def build_alert_sensors(config: DrConfig, status: dg.DefaultSensorStatus) -> list[dg.SensorDefinition]:
    interval = config.schedules.sensor_interval_s

    @dg.sensor(
        name=RUN_FAILURES,
        minimum_interval_seconds=interval,
        default_status=status,
        description="Alerts when any job's run fails (one alert per job until a run of it succeeds).",
    )
    def run_failures(context: dg.SensorEvaluationContext, dr: DrResource) -> dg.SensorResult:
        cfg = dr.config()
        book = IncidentBook(context.cursor)
        after = book.extra.get("updated_after") or time.time() - FIRST_LOOK_BACK.total_seconds()
        records = context.instance.get_run_records(
            filters=dg.RunsFilter(
                statuses=[dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.SUCCESS],
                updated_after=datetime.fromtimestamp(after, timezone.utc),
            ),
            order_by="update_timestamp",
            ascending=True,
            limit=500,
        )
        for r in records:  # oldest first: a failure then a success between ticks opens and resolves
            run = r.dagster_run
            subject = _run_subject(run)
            key = f"run:{subject}"
            if run.status == dg.DagsterRunStatus.FAILURE:
                book.observe(
                    key,
                    Alert(
                        key=key,
                        title=f"{subject} failed",
                        detail=_failure_detail(context.instance, run.run_id),
                        source=subject,
                        since=_iso(r.end_time or r.update_timestamp.timestamp()),
                        url=ui_url(cfg, f"/runs/{run.run_id}"),
                    ),
                )
            else:
                book.observe(key, None)
            after = max(after, r.update_timestamp.timestamp())
        book.extra["updated_after"] = after
        return _finish(context, cfg, book)

    @dg.sensor(
        name=CHECK_FAILURES,
        minimum_interval_seconds=interval,
        default_status=status,
        description="Alerts on the latest evaluation of every asset check that failed; resolves when it passes.",
    )
    def check_failures(context: dg.SensorEvaluationContext, dr: DrResource) -> dg.SensorResult:
        cfg = dr.config()
        book = IncidentBook(context.cursor)
        keys = list(context.repository_def.asset_graph.asset_check_keys)
        latest = context.instance.event_log_storage.get_latest_asset_check_execution_by_key(keys)
        for check_key, record in latest.items():
            if record.status.value not in ("SUCCEEDED", "FAILED") or check_key.name in ALERTED_ELSEWHERE:
                continue  # planned but not evaluated (its run failed or is running): the run sensor's
            evaluation = record.evaluation
            asset = check_key.asset_key.to_user_string()
            key = f"check:{asset}:{check_key.name}"
            if evaluation.passed:
                book.observe(key, None)
                continue
            book.observe(
                key,
                Alert(
                    key=key,
                    title=f"check {check_key.name} failed on {asset}",
                    detail=evaluation.description or "",
                    source=asset,
                    since=_iso(record.create_timestamp),
                    severity="warning" if evaluation.severity == dg.AssetCheckSeverity.WARN else "error",
                    url=ui_url(cfg, f"/assets/{quote(check_key.asset_key.to_user_string())}?view=checks"),
                ),
            )
        return _finish(context, cfg, book)

    @dg.sensor(
        name=STALENESS,
        minimum_interval_seconds=max(interval, 300),
        default_status=status,
        description="Alerts when a database's newest backup (in the repository, however it was taken) "
        "is older than its limit; resolves when a fresh one arrives.",
    )
    def staleness(context: dg.SensorEvaluationContext, dr: DrResource) -> dg.SensorResult:
        cfg = dr.config()
        book = IncidentBook(context.cursor)
        catalog = load_catalog(dr.locations(cfg).values())
        now = datetime.now(timezone.utc)
        for db in cfg.databases:
            outcome = check_freshness(cfg, db, catalog, now)
            key = f"stale:{db}"
            newest = outcome.metadata.get("newest_backup")
            since = (
                now
                if not newest
                else catalog.find(db, newest).manifest.created_at + timedelta(hours=outcome.metadata["limit_hours"])
            )
            stale = not outcome.passed and outcome.severity == health.ERROR  # past alert_after, not just the RPO
            book.observe(
                key,
                None
                if not stale
                else Alert(
                    key=key,
                    title=f"backups of {db} have stopped arriving",
                    detail=outcome.description,
                    source=f"database {db}" + (f" (newest {newest})" if newest else ""),
                    since=since.isoformat(timespec="seconds"),
                    url=ui_url(cfg, f"/assets/{db}/logical_backup"),
                ),
            )
        if cfg.file_sets:
            from dr_pipelines.core.files.catalog import load_snapshots
            from dr_pipelines.core.files.health import check_fresh

            snapshots = load_snapshots(dr.locations(cfg))
            for file_set in cfg.file_sets:
                outcome = check_fresh(cfg, file_set, snapshots, now)
                key = f"stale:files/{file_set}"
                book.observe(
                    key,
                    None
                    if outcome.passed
                    else Alert(
                        key=key,
                        title=f"snapshots of file set {file_set} have stopped arriving",
                        detail=outcome.description,
                        source=f"file set {file_set}",
                        since=now.isoformat(timespec="seconds"),
                        url=ui_url(cfg, f"/assets/files/{file_set}/snapshot"),
                    ),
                )
        return _finish(context, cfg, book)

    return [run_failures, check_failures, staleness]
