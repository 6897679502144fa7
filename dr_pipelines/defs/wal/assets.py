"""The WAL archive as an observed asset, and the observer sensor that refreshes it."""

from datetime import datetime, timezone

import dagster as dg

from dr_pipelines.core.config import DrConfig
from dr_pipelines.core.monitoring.alerts import IncidentBook
from dr_pipelines.core.repository.catalog import catalog_markdown, load_catalog
from dr_pipelines.core.repository.records import RecordKind, load_reports
from dr_pipelines.core.wal.archive import WalStatus, wal_status
from dr_pipelines.core.wal.stream_health import stream_health
from dr_pipelines.defs.backup.assets import database_key
from dr_pipelines.defs.monitoring.sensors import deliver_alerts
from dr_pipelines.defs.resources import DrResource

WAL_OBSERVER = "dr_wal_archive_observer"


def wal_archive_key(db: str) -> dg.AssetKey:
    return dg.AssetKey([db, "wal_archive"])


def wal_archive_spec(config: DrConfig, db: str) -> dg.AssetSpec:
    return dg.AssetSpec(
        wal_archive_key(db),
        deps=[database_key(db)],
        group_name=db,
        kinds={"postgres"},
        description=f"WAL of {db}, archived by PostgreSQL itself through `dr-pipelines wal-push`; "
        f"observed by the {WAL_OBSERVER} sensor (newest segment, lag, gaps).",
    )


def current_wal_status(cfg: DrConfig, db: str, locations) -> WalStatus:
    bases = load_catalog(locations.values(), db, "base").entries
    return wal_status(cfg, db, locations, datetime.now(timezone.utc), [e.manifest.base.wal_start for e in bases])


def wal_metadata(s: WalStatus) -> dict:
    return {
        "newest_segment": s.newest_segment or "",
        "segments": s.segments,
        "gaps": len(s.gaps),
        "archive_lag_s": -1.0 if s.archive_lag_s is None else round(s.archive_lag_s, 1),
        "failed_count": -1 if s.failed_count is None else s.failed_count,
    }


def catalog_metadata(db: str, locations) -> dict:
    """The backups of a database as a Markdown table, with whether a restore of each was proven."""
    catalog = load_catalog(locations.values(), db)
    tested = {}
    for record in reversed(
        load_reports(locations, db, RecordKind.RESTORE_TEST) + load_reports(locations, db, RecordKind.PITR_TEST)
    ):
        if record.backup_id and record.finished_at:
            tested[record.backup_id] = record.passed  # the newest test of a backup wins
    entries = [e for e in catalog.entries if e.manifest.database == db]
    return {
        "backup_catalog": dg.MetadataValue.md(catalog_markdown(entries, tested)),
        "backups": len(entries),
        "newest_backup": entries[0].id if entries else "",
    }


def build_wal_observer(config: DrConfig, status: dg.DefaultSensorStatus) -> dg.SensorDefinition:
    @dg.sensor(
        name=WAL_OBSERVER,
        minimum_interval_seconds=config.schedules.sensor_interval_s,
        default_status=status,
        description="Observes each WAL archive (newest segment, archive lag, gaps: plotted on the asset) and "
        "refreshes each database's backup catalog (a table on DB/database: the ids to paste into a restore). "
        "For streamed WAL (wal-stream): the lag, the slot's retained WAL, and alerts when the streamer is "
        "down, the slot holds back more than streaming.max_slot_wal, a slot outlives streaming, or a "
        "location lacks streamed segments.",
    )
    def observe(context: dg.SensorEvaluationContext, dr: DrResource) -> dg.SensorResult:
        cfg = dr.config()
        locations = dr.locations(cfg)
        book = IncidentBook(context.cursor)  # streaming's incidents: one alert each, resolved when cleared
        events = []
        now = datetime.now(timezone.utc)
        for db in cfg.databases:
            events.append(dg.AssetObservation(asset_key=database_key(db), metadata=catalog_metadata(db, locations)))
            s = current_wal_status(cfg, db, locations)
            stream = stream_health(cfg, db, locations, now, server_down=s.server_error)
            for key, alert in stream.alerts.items():
                book.observe(key, alert)
            if s.segments or s.failed_count or stream.enabled:
                metadata = wal_metadata(s) | (stream.metadata() if stream.enabled else {})
                events.append(dg.AssetObservation(asset_key=wal_archive_key(db), metadata=metadata))
        # it launches no run, so Dagster calls every tick "skipped": the reason says what it did
        observed = sum(1 for e in events if e.asset_key != database_key(e.asset_key.path[0]))
        alerts = deliver_alerts(context, cfg, book)
        return dg.SensorResult(
            asset_events=events,
            cursor=book.to_json(),
            skip_reason=f"observed: the backup catalog of {len(cfg.databases)} database(s), {observed} WAL "
            f"archive(s); streaming: {alerts}",
        )

    return observe
