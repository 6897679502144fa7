"""Restore tests: every backup proven restorable in a scratch database, with its RTO measured."""

from __future__ import annotations

import secrets
import time
from datetime import datetime, timezone

from dr_pipelines.core.config import DrConfig
from dr_pipelines.core.log import Log
from dr_pipelines.core.postgres.client import connect
from dr_pipelines.core.repository.records import RecordKind
from dr_pipelines.core.restore.load import restore_into, scratch_directory
from dr_pipelines.core.restore.report import (
    RestoreReport,
    describe_backup,
    store_report,
)
from dr_pipelines.core.restore.request import RestoreRequest
from dr_pipelines.core.restore.target import drop_database
from dr_pipelines.core.restore.validation import validate_database
from dr_pipelines.core.storage.base import Location
from dr_pipelines.core.sweep import keep_database


def restore_test_name(database: str) -> str:
    return f"dr_restore_test_{database[:24]}_{datetime.now(timezone.utc):%Y%m%d%H%M%S}_{secrets.token_hex(2)}"


def run_restore_test(
    config: DrConfig,
    database: str,
    locations: dict[str, Location],
    backup: str = "latest",
    keep: bool = False,
    log: Log = lambda m: None,
) -> RestoreReport:
    """Restore a backup into a scratch database on the test server, validate it against the
    manifest, measure the RTO, and drop it (unless `keep`). A validation failure is reported with
    passed=False; a backup that cannot be fetched at all raises."""
    db = config.database(database)
    server = db.test_server()
    started = datetime.now(timezone.utc)
    t0 = time.monotonic()
    scratch = restore_test_name(database)
    report = RestoreReport(
        kind=RecordKind.RESTORE_TEST, database=database, target=scratch, started_at=started.isoformat()
    )
    request = RestoreRequest(database, backup=backup, jobs=db.restore_test.jobs, no_owner=True, no_privileges=True)
    created = False
    try:
        with scratch_directory(config, database) as work:
            created = True
            fetched, steps = restore_into(config, locations, request, server, scratch, work, True, log)
            report.steps_s.update(steps)
            describe_backup(report, fetched, started)
        t1 = time.monotonic()
        with connect(server, database, dbname=scratch, autocommit=True) as conn:
            result = validate_database(conn, fetched.manifest, db.validation)
        report.steps_s["validate"] = round(time.monotonic() - t1, 3)
        report.validation = result.to_dict()
        report.passed = result.passed
        report.rto_s = round(time.monotonic() - t0, 3)
        log(f"restore test of {report.backup_id}: {result.summary()}; RTO {report.rto_s:.1f}s")
        if not result.passed:
            report.error = result.summary()
    except Exception as e:
        report.error = str(e)
        raise
    finally:
        report.finished_at = datetime.now(timezone.utc).isoformat()
        if created and not keep:
            try:
                drop_database(server, database, scratch)
            except Exception as e:  # reported, never hides the test's own outcome
                log(f"warning: could not drop scratch database {scratch!r}: {e}")
        elif created:
            with connect(server, database, dbname="postgres", autocommit=True) as conn:
                keep_database(conn, scratch)  # kept on purpose: no sweep may drop it
            log(f"scratch database {scratch!r} kept on {server.host}:{server.port}")
        store_report(locations, report, log)
    return report
