"""Operating the system: health checks, alerts (against a real HTTP receiver), Prometheus metrics
(against Debian's Pushgateway), the compliance report and `status`, on real backups."""

import json
import time
import urllib.request
from datetime import datetime, timezone
from types import SimpleNamespace

import dagster as dg
import pytest

from dr_pipelines.core.backup.logical import run_logical_backup
from dr_pipelines.core.errors import DrError
from dr_pipelines.core.monitoring import health
from dr_pipelines.core.monitoring.alerts import Alert, IncidentBook, PagerDutyChannel, WebhookChannel
from dr_pipelines.core.monitoring.health import evaluate
from dr_pipelines.core.monitoring.metrics import MetricsError, build_registry, export
from dr_pipelines.core.repository.catalog import load_catalog
from dr_pipelines.core.restore.restore_test import run_restore_test
from dr_pipelines.core.storage.locations import open_locations
from dr_pipelines.defs.backup.assets import logical_backup_job_name
from dr_pipelines.defs.build import build_definitions
from dr_pipelines.defs.monitoring.sensors import CHECK_FAILURES, RUN_FAILURES, STALENESS
from dr_pipelines_tests.support.configs import config_from, local_location, s3_location
from dr_pipelines_tests.support.metadata import number, text
from dr_pipelines_tests.support.metrics import metric_value
from dr_pipelines_tests.support.processes import run_cli

PD_KEY = "R0UTINGKEY0123456789012345678901"


def _config(write_config, pg, tmp_path, receiver=None, s3=None, **extra):
    locations = {"local": local_location(tmp_path / "backups")}
    if s3 is not None:
        locations["s3"] = s3_location(s3)
    alerts = {}
    if receiver is not None:
        alerts = {
            "chat": {"type": "webhook", "url_env": "DR_TEST_WEBHOOK", "format": "slack"},
            "pager": {"type": "pagerduty", "routing_key_env": "DR_TEST_PD_KEY", "url": f"{receiver.url}/pd"},
        }
    path = write_config(pg, locations, alerts=alerts, **extra)
    return path, config_from(path)


@pytest.fixture
def alert_env(monkeypatch, receiver):
    monkeypatch.setenv("DR_TEST_WEBHOOK", f"{receiver.url}/hook")
    monkeypatch.setenv("DR_TEST_PD_KEY", PD_KEY)


def _tick(defs, name, instance, cursor):
    sensor = defs.resolve_sensor_def(name)
    with dg.build_sensor_context(instance=instance, cursor=cursor, definitions=defs, resources=defs.resources) as ctx:
        data = sensor.evaluate_tick(ctx)  # as the daemon does: resources come from the context
    return SimpleNamespace(cursor=data.cursor, skip_reason=data.skip_message or "")


# --------------------------------------------------------------------------- checks


def test_checks_catch_half_size_corruption_and_missing_copy(pg, s3, write_config, tmp_path):
    path, cfg = _config(write_config, pg, tmp_path, s3=s3)  # default checks: ±50% of the mean of >= 3
    locations = open_locations(cfg)
    for _ in range(4):
        run_logical_backup(cfg, "app", locations)
    defs = build_definitions(cfg, str(path))
    instance = dg.DagsterInstance.ephemeral()

    def run_checks(job):
        result = defs.resolve_job_def(job).execute_in_process(instance=instance, raise_on_error=False)
        return result, {e.asset_check_key.name: e for e in result.get_asset_check_evaluations()}

    result, evals = run_checks("dr_health_checks")
    assert all(evals[n].passed for n in (health.FRESHNESS, health.SIZE, health.REPLICATION, health.LAST_ATTEMPT))
    assert abs(number(evals[health.SIZE].metadata["deviation_pct"].value)) < 10

    # a backup half the usual size (or smaller): a warning with the history, not a failed run
    with pg.connect("app") as conn:
        conn.execute("DELETE FROM fingerprints WHERE id % 5 < 3")
    half = run_logical_backup(cfg, "app", locations).manifest
    result, evals = run_checks("dr_health_checks")
    size = evals[health.SIZE]
    assert not size.passed and size.severity == dg.AssetCheckSeverity.WARN
    assert number(size.metadata["deviation_pct"].value) <= -50 and size.metadata["size_bytes"].value == half.size_bytes
    assert half.id in text(size.metadata["history_table"].value)

    # a corrupt object on one location: the blocking integrity check fails the run, naming it
    obj = tmp_path / "backups" / half.prefix / half.objects[0].name
    data = bytearray(obj.read_bytes())
    data[len(data) // 2] ^= 0x01
    obj.write_bytes(bytes(data))
    result, evals = run_checks("dr_integrity_checks")
    assert not result.success
    integrity = evals[health.INTEGRITY]
    assert (
        not integrity.passed
        and "on local: FAILED" in (integrity.description or "")
        and "SHA-256" in (integrity.description or "")
    )

    # the newest backup missing on one location
    import boto3

    s3c = boto3.client("s3", endpoint_url=s3.url, region_name="us-east-1")
    s3c.delete_object(Bucket="dr-backups", Key=f"soundhash-backups/{half.prefix}/manifest.json")
    result, evals = run_checks("dr_health_checks")
    # the catalog's newest is now the half backup on local only: replication names s3
    repl = evals[health.REPLICATION]
    assert not repl.passed and "missing on s3" in (repl.description or "")

    # and the failed-check sensor alerts on what failed, from the instance's latest evaluations
    result = _tick(defs, CHECK_FAILURES, instance, None)
    open_keys = IncidentBook(result.cursor).open_keys()
    backup_checks = {k for k in open_keys if k.startswith("check:app/logical_backup:")}
    # integrity is blocking: its failure failed the run, and the run-failure sensor alerts on that
    assert backup_checks == {f"check:app/logical_backup:{n}" for n in (health.SIZE, health.REPLICATION)}
    runs = _tick(defs, RUN_FAILURES, instance, None)
    assert "run:job dr_integrity_checks" in IncidentBook(runs.cursor).open_keys()
    assert "check:app/restore_test:restore_test_recent" in open_keys  # no restore test ran here


# --------------------------------------------------------------------------- alerts


def test_run_failure_alert_once_then_resolved(make_pg, write_config, tmp_path, receiver, alert_env):
    server = make_pg()
    server.create_database("app")
    receiver.start()
    path, cfg = _config(write_config, server, tmp_path, receiver=receiver)
    defs = build_definitions(cfg, str(path))
    instance = dg.DagsterInstance.ephemeral()
    job = defs.resolve_job_def(logical_backup_job_name("app"))

    server.cluster.stop("fast")
    assert not job.execute_in_process(instance=instance, raise_on_error=False).success
    first = _tick(defs, RUN_FAILURES, instance, None)
    [hook] = receiver.bodies("/hook")
    assert "job app__logical_backup_job failed" in hook["text"] and "is unreachable" in hook["text"]
    assert "http://127.0.0.1:3000/runs/" in hook["text"]
    [pd] = receiver.bodies("/pd")
    assert pd["event_action"] == "trigger" and pd["routing_key"] == PD_KEY
    assert pd["dedup_key"] == "dr_pipelines:run:job app__logical_backup_job"
    assert pd["payload"]["severity"] == "critical" and pd["payload"]["source"] == "job app__logical_backup_job"

    # the failed run left its checks planned, not evaluated: the check sensor must not trip on them
    checks_tick = _tick(defs, CHECK_FAILURES, instance, None)
    assert IncidentBook(checks_tick.cursor).open_keys() == set() and len(receiver.received) == 2

    # the same failure again, and another tick: still one alert per incident
    assert not job.execute_in_process(instance=instance, raise_on_error=False).success
    second = _tick(defs, RUN_FAILURES, instance, first.cursor)
    third = _tick(defs, RUN_FAILURES, instance, second.cursor)
    assert len(receiver.received) == 2

    # it clears: a resolved notice on each channel
    server.cluster.start()
    assert job.execute_in_process(instance=instance).success
    fourth = _tick(defs, RUN_FAILURES, instance, third.cursor)
    assert "RESOLVED" in receiver.bodies("/hook")[-1]["text"]
    assert receiver.bodies("/pd")[-1] == {
        "routing_key": PD_KEY,
        "event_action": "resolve",
        "dedup_key": pd["dedup_key"],
    }
    assert IncidentBook(fourth.cursor).incidents == {}
    assert len(receiver.received) == 4


def test_staleness_alert_retried_while_receiver_down(pg, write_config, tmp_path, receiver, alert_env):
    """A backup that stops arriving: one alert (delivered once the receiver is back), then resolved."""
    path, cfg = _config(write_config, pg, tmp_path, receiver=receiver, database={"objectives": {"alert_after": "4s"}})
    locations = open_locations(cfg)
    run_logical_backup(cfg, "app", locations)
    defs = build_definitions(cfg, str(path))
    instance = dg.DagsterInstance.ephemeral()
    fresh = _tick(defs, STALENESS, instance, None)
    assert IncidentBook(fresh.cursor).open_keys() == set()

    time.sleep(4.5)
    stale = health.check_freshness(cfg, "app", load_catalog(locations.values()), datetime.now(timezone.utc))
    assert not stale.passed and stale.severity == health.ERROR and "stopped arriving" in stale.description
    down = _tick(defs, STALENESS, instance, fresh.cursor)  # receiver not started: nothing crashes
    assert "delivery failed" in down.skip_reason and "cannot reach the receiver" in down.skip_reason
    assert IncidentBook(down.cursor).open_keys() == {"stale:app"}

    receiver.start()
    delivered = _tick(defs, STALENESS, instance, down.cursor)
    [hook] = receiver.bodies("/hook")
    assert "backups of app have stopped arriving" in hook["text"] and "limit" in hook["text"]
    again = _tick(defs, STALENESS, instance, delivered.cursor)
    assert len(receiver.bodies("/hook")) == 1 and len(receiver.bodies("/pd")) == 1

    run_logical_backup(cfg, "app", locations)
    _tick(defs, STALENESS, instance, again.cursor)
    assert "RESOLVED: backups of app have stopped arriving" in receiver.bodies("/hook")[-1]["text"]
    assert receiver.bodies("/pd")[-1]["event_action"] == "resolve"


def test_incident_book_failed_and_cleared_between_ticks(receiver):
    receiver.start()
    channels = [
        WebhookChannel("chat", f"{receiver.url}/hook", "discord"),
        PagerDutyChannel("pager", PD_KEY, f"{receiver.url}/pd"),
    ]
    book = IncidentBook()
    alert = Alert("run:x", "job x failed", "boom", "job x", "2026-11-23T10:00:00+00:00", "http://ui/runs/1")
    book.observe("run:x", alert)
    book.observe("run:x", None)
    assert book.deliver(channels) == []
    hooks = receiver.bodies("/hook")
    assert [h["content"].split(":")[0] for h in hooks] == ["ERROR", "RESOLVED"]
    assert [p["event_action"] for p in receiver.bodies("/pd")] == ["trigger", "resolve"]
    assert book.incidents == {}
    # a receiver answering 500: reported, retried later, never raised
    receiver.status = 500
    book.observe("run:y", Alert("run:y", "job y failed", "", "job y", "t", "u"))
    errors = book.deliver(channels)
    assert len(errors) == 2 and "HTTP 500" in errors[0]
    receiver.status = 200
    assert book.deliver(channels) == [] and receiver.bodies("/hook")[-1]["content"].startswith("ERROR: job y")


# --------------------------------------------------------------------------- metrics, report, status


def test_metrics_textfile_and_pushgateway(pg, write_config, tmp_path, pushgateway):
    path, cfg = _config(
        write_config,
        pg,
        tmp_path,
        metrics={"textfile": str(tmp_path / "prom" / "dr.prom"), "pushgateway_url": pushgateway.url},
    )
    locations = open_locations(cfg)
    m = run_logical_backup(cfg, "app", locations).manifest
    run_restore_test(cfg, "app", locations)
    h = evaluate(cfg, locations, datetime.now(timezone.utc))
    done = export(cfg, build_registry(cfg, h))
    assert done == [str(tmp_path / "prom" / "dr.prom"), pushgateway.url]
    text = (tmp_path / "prom" / "dr.prom").read_text()
    assert metric_value(text, "backup_size_bytes", database="app", kind="logical") == m.size_bytes
    assert metric_value(text, "last_backup_timestamp", database="app") == pytest.approx(m.created_at.timestamp())
    assert metric_value(text, "backup_success", database="app") == 1
    assert 0 <= metric_value(text, "backup_age_hours", database="app") < 0.1
    assert metric_value(text, "restore_test_success", database="app") == 1
    assert metric_value(text, "restore_test_rto_seconds", database="app") > 0
    pushed = urllib.request.urlopen(f"{pushgateway.url}/metrics").read().decode()
    assert metric_value(pushed, "backup_size_bytes", database="app", job="dr_pipelines") == m.size_bytes

    # the Pushgateway down: a clear error naming it
    pushgateway.stop()
    with pytest.raises(MetricsError, match="cannot push metrics to the Pushgateway at http://127.0.0.1"):
        export(cfg, build_registry(cfg, h))


def test_report_and_status(make_pg, write_config, tmp_path):
    server = make_pg()
    server.create_database("app")
    path, cfg = _config(write_config, server, tmp_path, database={"objectives": {"rpo": "1h", "rto": "10m"}})
    locations = open_locations(cfg)
    assert run_cli("--config", str(path), "status").returncode == 2  # nothing yet: error

    first = run_logical_backup(cfg, "app", locations).manifest
    server.cluster.stop("fast")
    with pytest.raises(DrError):
        run_logical_backup(cfg, "app", locations)
    server.cluster.start()
    second = run_logical_backup(cfg, "app", locations).manifest
    run_restore_test(cfg, "app", locations)

    status = run_cli("--config", str(path), "status", "--json")
    assert status.returncode == 0, status.stdout + status.stderr
    assert json.loads(status.stdout)["status"] == "ok"

    report = run_cli("--config", str(path), "report", "--days", "7", "--json", "--store")
    assert report.returncode == 0, report.stderr
    data = json.loads(report.stdout)
    [row] = data["summary"]
    assert (row["attempted"], row["succeeded"], row["success_rate_pct"]) == (3, 2, 66.7)
    assert row["backups"] == 2 and row["restore_tests"] == 1 and row["restore_test_pass_rate_pct"] == 100
    assert row["rpo_met"] is True and 0 < row["rpo_achieved_s"] < 3600
    assert row["rto_min_s"] == row["rto_max_s"] > 0 and row["rto_met"] is True
    [storage] = data["storage"]
    assert storage == {"location": "local", "backups": 2, "bytes": first.size_bytes + second.size_bytes}
    assert any("1 of 3 logical backup attempts failed" in r for r in data["recommendations"])
    stored = sorted(p.suffix for p in (tmp_path / "backups" / "compliance").iterdir())
    assert stored == [".html", ".json", ".md"]
    html = next((tmp_path / "backups" / "compliance").glob("*.html")).read_text()
    assert "<table" in html and "backup attempts failed" in html

    # the last attempt failing makes status an error, naming it
    server.cluster.stop("fast")
    with pytest.raises(DrError):
        run_logical_backup(cfg, "app", locations)
    status = run_cli("--config", str(path), "status")
    assert status.returncode == 2 and "last backup attempt" in status.stdout and "failed" in status.stdout
    server.cluster.start()


def test_status_warning_exit_code(pg, write_config, tmp_path):
    """A warning (measured RTO over the objective) is exit 1, not 0 and not 2."""
    path, cfg = _config(write_config, pg, tmp_path, database={"objectives": {"rto": "0.001s"}})
    locations = open_locations(cfg)
    run_logical_backup(cfg, "app", locations)
    run_restore_test(cfg, "app", locations)
    status = run_cli("--config", str(path), "status")
    assert status.returncode == 1, status.stdout
    assert "WARNING" in status.stdout and "rto_within_objective" in status.stdout
    assert "ERROR" not in status.stdout
