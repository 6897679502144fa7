"""Prometheus metrics from the repository's health: a node-exporter textfile and/or a Pushgateway.

Names follow the SongNodes monitoring section (`backup_age_hours`, `backup_size_bytes`,
`backup_success`, `last_backup_timestamp`), labelled by database and kind.
"""

from __future__ import annotations

import re
from datetime import datetime
from pathlib import Path

from prometheus_client import (
    CollectorRegistry,
    Gauge,
    push_to_gateway,
    write_to_textfile,
)

from dr_pipelines.core.config import DrConfig
from dr_pipelines.core.errors import DrError
from dr_pipelines.core.monitoring.health import Health


class MetricsError(DrError):
    pass


def build_registry(config: DrConfig, h: Health) -> CollectorRegistry:
    reg = CollectorRegistry()
    labels = ["database", "kind"]
    age = Gauge("backup_age_hours", "Age of the newest backup, hours", labels, registry=reg)
    size = Gauge("backup_size_bytes", "Stored size of the newest backup, bytes", labels, registry=reg)
    success = Gauge("backup_success", "1 if the last backup attempt succeeded, else 0", labels, registry=reg)
    last = Gauge("last_backup_timestamp", "Creation time of the newest backup, Unix seconds", labels, registry=reg)
    count = Gauge("backup_count", "Backups in the repository", labels, registry=reg)
    rto = Gauge(
        "restore_test_rto_seconds", "Restore time measured by the last restore test", ["database"], registry=reg
    )
    rto_obj = Gauge("restore_test_rto_objective_seconds", "The RTO objective", ["database"], registry=reg)
    rt_ok = Gauge("restore_test_success", "1 if the last restore test passed, else 0", ["database"], registry=reg)
    rt_ts = Gauge("restore_test_timestamp", "Start of the last restore test, Unix seconds", ["database"], registry=reg)
    status = Gauge("dr_check_ok", "1 if the health check passes, else 0", ["database", "check"], registry=reg)
    wal_lag = Gauge("wal_archive_lag_seconds", "How far archived WAL is behind the server", ["database"], registry=reg)
    wal_segments = Gauge("wal_archive_segments", "WAL segments in the archive", ["database"], registry=reg)
    wal_gaps = Gauge("wal_archive_gaps", "Missing WAL runs after the oldest base backup", ["database"], registry=reg)
    pitr_rto = Gauge(
        "pitr_test_rto_seconds", "Recovery time measured by the last PITR drill", ["database"], registry=reg
    )
    new_bytes = Gauge(
        "snapshot_new_bytes",
        "Plain bytes the newest file snapshot had to store (its change)",
        ["database"],
        registry=reg,
    )
    pitr_ok = Gauge("pitr_test_success", "1 if the last PITR drill passed, else 0", ["database"], registry=reg)
    for db, w in h.wal.items():
        if w.archive_lag_s is not None:
            wal_lag.labels(db).set(w.archive_lag_s)
        wal_segments.labels(db).set(w.segments)
        wal_gaps.labels(db).set(len(w.gaps))
    for db, drills in h.pitr_tests.items():
        if drills:
            pitr_ok.labels(db).set(1 if drills[0].passed else 0)
            if drills[0].rto_s is not None:
                pitr_rto.labels(db).set(drills[0].rto_s)
    for db in config.databases:
        for kind in ("logical", "base"):
            backups = [e for e in h.catalog.entries if e.manifest.database == db and e.manifest.kind == kind]
            if kind == "base" and not backups and db not in h.wal:
                continue  # not physically backed up: no base-backup series at all
            count.labels(db, kind).set(len(backups))
            if backups:
                m = backups[0].manifest
                age.labels(db, kind).set((h.now - m.created_at).total_seconds() / 3600)
                size.labels(db, kind).set(m.size_bytes)
                last.labels(db, kind).set(m.created_at.timestamp())
            attempts = [a for a in h.attempts.get(db, []) if (a.kind or "logical") == kind]
            if attempts or backups:
                success.labels(db, kind).set(1 if (attempts[0].succeeded if attempts else True) else 0)
        tests = h.restore_tests.get(db, [])
        rto_obj.labels(db).set(config.database(db).objectives.rto.total_seconds())
        if tests:
            rt_ok.labels(db).set(1 if tests[0].passed else 0)
            rt_ts.labels(db).set(datetime.fromisoformat(tests[0].started_at).timestamp())
            if tests[0].rto_s is not None:
                rto.labels(db).set(tests[0].rto_s)
    for file_set in config.file_sets:
        subject = f"files/{file_set}"
        snaps = [e for e in (h.snapshots.entries if h.snapshots else []) if e.index.file_set == file_set]
        count.labels(subject, "snapshot").set(len(snaps))
        if snaps:
            age.labels(subject, "snapshot").set((h.now - snaps[0].index.created_at).total_seconds() / 3600)
            size.labels(subject, "snapshot").set(snaps[0].index.size_bytes)
            last.labels(subject, "snapshot").set(snaps[0].index.created_at.timestamp())
            new_bytes.labels(subject).set(snaps[0].index.stats.bytes_new)
        attempts = h.attempts.get(subject, [])
        if attempts or snaps:
            success.labels(subject, "snapshot").set(1 if (attempts[0].succeeded if attempts else True) else 0)
        tests = h.restore_tests.get(subject, [])
        if tests:
            rt_ok.labels(subject).set(1 if tests[0].passed else 0)
            rt_ts.labels(subject).set(datetime.fromisoformat(tests[0].started_at).timestamp())
            if tests[0].rto_s is not None:
                rto.labels(subject).set(tests[0].rto_s)
    for o in h.outcomes:
        if o.database != "*":
            status.labels(o.database, o.check).set(1 if o.passed else 0)
    drills = h.recoveries.get("drill", [])
    if drills:  # the whole system, as the weekly drill measured it, beside its objectives
        sys_rto = Gauge("system_drill_rto_seconds", "Whole-system RTO of the newest full-system drill", registry=reg)
        sys_loss = Gauge("system_drill_data_loss_seconds", "Data loss of the newest full-system drill", registry=reg)
        sys_ok = Gauge("system_drill_success", "1 if the newest full-system drill passed, else 0", registry=reg)
        objective = Gauge("system_objective_seconds", "The whole system's objectives", ["objective"], registry=reg)
        sys_rto.set(drills[0].rto_s or 0)
        sys_loss.set((drills[0].model_extra or {}).get("data_loss_s") or 0)
        sys_ok.set(1 if drills[0].passed else 0)
        objective.labels("rto").set(config.recovery.rto.total_seconds())
        objective.labels("rpo").set(config.recovery.rpo.total_seconds())
    return reg


def export(
    config: DrConfig, reg: CollectorRegistry, textfile: str | None = None, pushgateway_url: str | None = None
) -> list[str]:
    """Write the textfile atomically (prometheus_client writes a temp file and renames it) and push.
    Returns where the metrics went; raises MetricsError naming what failed."""
    textfile = textfile or config.metrics.textfile
    pushgateway_url = pushgateway_url or config.metrics.pushgateway_url
    done = []
    if textfile:
        path = Path(textfile).expanduser()
        if not path.is_absolute():
            path = config.base_dir / path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_to_textfile(str(path), reg)
        except OSError as e:
            raise MetricsError(
                f"cannot write the metrics textfile {path}: {e.strerror}; "
                "check metrics.textfile and the directory's permissions"
            ) from None
        done.append(str(path))
    if pushgateway_url:
        shown = re.sub(r"//[^@/]*@", "//", pushgateway_url)  # never print credentials in the URL
        try:
            push_to_gateway(pushgateway_url, job=config.metrics.job, registry=reg, timeout=10)
        except OSError as e:
            raise MetricsError(
                f"cannot push metrics to the Pushgateway at {shown}: {str(e).replace(pushgateway_url, shown)}; "
                "is it running? (metrics.pushgateway_url)"
            ) from None
        done.append(shown)
    return done
