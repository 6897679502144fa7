"""Physical backups in Dagster: `DB/base_backup`, the `DB/wal_archive` (observed by a sensor, with
continuity and lag checks), the `point_in_time_recovery` job and the `DB/pitr_test` drill."""

import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

import dagster as dg
from pydantic import Field

from dr_pipelines.core.base_backup import run_base_backup
from dr_pipelines.core.config import DrConfig
from dr_pipelines.core.cluster import LocalCluster, free_port
from dr_pipelines.core.pitr import PitrFailed, PitrRequest, query_as_postgres, run_pitr
from dr_pipelines.core.repository import load_catalog, store_record
from dr_pipelines.core.health import PITR_TEST, WAL_CONTINUOUS, WAL_LAG, check_wal
from dr_pipelines.core.wal import WalStatus, wal_status
from dr_pipelines.defs.failures import domain_failures
from dr_pipelines.defs.health import check_result
from dr_pipelines.defs.logical_backup import database_key
from dr_pipelines.defs.resources import locations_from_context, storage_resource_keys

PITR_PASSED = PITR_TEST
WAL_OBSERVER = "dr_wal_archive_observer"


def base_backup_key(db: str) -> dg.AssetKey:
    return dg.AssetKey([db, "base_backup"])


def wal_archive_key(db: str) -> dg.AssetKey:
    return dg.AssetKey([db, "wal_archive"])


def pitr_test_key(db: str) -> dg.AssetKey:
    return dg.AssetKey([db, "pitr_test"])


def build_base_backup_asset(config: DrConfig, db: str) -> dg.AssetsDefinition:
    @dg.asset(key=base_backup_key(db), deps=[database_key(db)], group_name=db, kinds={"postgres"},
              description=f"Physical base backup of {db}: `pg_basebackup -Ft` streamed through "
                          f"{config.compression.method} and {config.encryption.method} encryption to every location, "
                          "PostgreSQL's backup_manifest inside; complete only once its WAL is archived.",
              required_resource_keys={"dr", *storage_resource_keys(config)}, pool=f"pg_{db}")
    def base_backup(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        with domain_failures():
            cfg = context.resources.dr.load()
            result = run_base_backup(cfg, db, locations_from_context(context, cfg), log=context.log.info)
        m = result.manifest
        return dg.MaterializeResult(metadata={
            "backup_id": m.id, "size_bytes": m.size_bytes, "uncompressed_bytes": m.uncompressed_bytes,
            "duration_s": m.duration_s, "compression_ratio": result.compression_ratio,
            "sha256": m.objects[0].sha256, "locations": ", ".join(result.locations),
            "start_lsn": m.extra["start_lsn"], "stop_lsn": m.extra["stop_lsn"], "timeline": m.extra["timeline"],
            "wal_start": m.extra["wal_start"], "wal_stop": m.extra["wal_stop"],
            "created_at": dg.MetadataValue.timestamp(m.created_at)}, data_version=dg.DataVersion(m.id))

    return base_backup


def wal_archive_spec(config: DrConfig, db: str) -> dg.AssetSpec:
    return dg.AssetSpec(wal_archive_key(db), deps=[database_key(db)], group_name=db, kinds={"postgres"},
                        description=f"WAL of {db}, archived by PostgreSQL itself through `dr-pipelines wal-push`; "
                                    f"observed by the {WAL_OBSERVER} sensor (newest segment, lag, gaps).")


def current_wal_status(cfg: DrConfig, db: str, locations) -> WalStatus:
    bases = load_catalog(locations.values(), db, "base").entries
    return wal_status(cfg, db, locations, datetime.now(timezone.utc), [e.manifest.extra["wal_start"] for e in bases])


def wal_metadata(s: WalStatus) -> dict:
    return {"newest_segment": s.newest_segment or "", "segments": s.segments, "gaps": len(s.gaps),
            "archive_lag_s": -1.0 if s.archive_lag_s is None else round(s.archive_lag_s, 1),
            "failed_count": -1 if s.failed_count is None else s.failed_count}


def build_wal_checks(config: DrConfig, db: str) -> list[dg.AssetChecksDefinition]:
    """Continuity and lag, computed by core.health (the same verdict as `status` and the metrics)."""
    keys = {"dr", *storage_resource_keys(config)}

    def make(name: str, description: str) -> dg.AssetChecksDefinition:
        @dg.asset_check(asset=wal_archive_key(db), name=name, required_resource_keys=keys, description=description)
        def _check(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
            with domain_failures():
                cfg = context.resources.dr.load()
                outcomes = check_wal(cfg, current_wal_status(cfg, db, locations_from_context(context, cfg)))
            return check_result(next(o for o in outcomes if o.check == name))

        return _check

    rpo = config.database(db).objectives.rpo.total_seconds()
    return [make(WAL_CONTINUOUS, "Every WAL segment from the oldest retained base backup's start to the newest is archived."),
            make(WAL_LAG, f"WAL is archived within the RPO ({rpo:.0f} s).")]


def build_wal_observer(config: DrConfig, status: dg.DefaultSensorStatus) -> dg.SensorDefinition:
    @dg.sensor(name=WAL_OBSERVER, minimum_interval_seconds=config.schedules.sensor_interval_s, default_status=status,
               required_resource_keys={"dr", *storage_resource_keys(config)},
               description="Observes each WAL archive: newest segment, archive lag, gaps (plotted on the asset).")
    def observe(context: dg.SensorEvaluationContext) -> dg.SensorResult:
        cfg = context.resources.dr.load()
        locations = locations_from_context(context, cfg)
        events = []
        for db in cfg.databases:
            s = current_wal_status(cfg, db, locations)
            if s.segments or s.failed_count:
                events.append(dg.AssetObservation(asset_key=wal_archive_key(db), metadata=wal_metadata(s)))
        return dg.SensorResult(asset_events=events, skip_reason=None if events else "no WAL archive yet")

    return observe


class PitrConfig(dg.Config):
    database: str = Field(description="Which configured database to recover.")
    target_time: Optional[str] = Field(default=None, description="ISO 8601 with a time zone, e.g. 2026-11-23T10:15:00+00:00.")
    target_lsn: Optional[str] = Field(default=None, description="e.g. 0/3000060")
    target_xid: Optional[str] = Field(default=None, description="a transaction id")
    target_name: Optional[str] = Field(default=None, description="a restore point (pg_create_restore_point)")
    data_dir: str = Field(description="A NEW data directory for the recovered cluster (never a running cluster's).")
    port: int = Field(description="Port for the recovered cluster (127.0.0.1).")
    overwrite: bool = Field(default=False, description="Replace a non-empty data_dir. Needs `confirm`.")
    confirm: Optional[str] = Field(default=None, description="Type data_dir again to confirm overwriting it.")
    archive: bool = Field(default=False, description="Keep archiving WAL from the recovered cluster (new primary).")
    timeout_s: float = Field(default=600, description="How long replay may take.")
    backup_id: Optional[str] = Field(default=None, description="A base backup id; default: the newest before the target.")

    def request(self) -> PitrRequest:
        from dr_pipelines.core.config import ConfigError

        data_dir = Path(self.data_dir).expanduser().resolve()
        if self.overwrite and (self.confirm or "") != str(data_dir):
            raise ConfigError(f"overwrite replaces {data_dir}: type it in `confirm` to proceed")
        when = datetime.fromisoformat(self.target_time) if self.target_time else None
        return PitrRequest(self.database, data_dir, self.port, target_time=when, target_lsn=self.target_lsn,
                           target_xid=self.target_xid, target_name=self.target_name, overwrite=self.overwrite,
                           archive=self.archive, timeout_s=self.timeout_s, backup_id=self.backup_id)


def _store(locations, database: str, started_at: str, data: dict, kind: str, log) -> None:
    import json

    store_record(locations, database, kind, started_at, json.dumps(data, default=str).encode(), log)


def build_pitr_job(config: DrConfig) -> dg.JobDefinition:
    keys = {"dr", *storage_resource_keys(config)}

    @dg.op(required_resource_keys=keys, description="Pick the newest base backup before the target, restore it into "
           "the new directory, replay archived WAL to the target, promote; report the point reached and the RTO.")
    def recover_to_point(context: dg.OpExecutionContext, config: PitrConfig) -> dict:
        with domain_failures():
            cfg = context.resources.dr.load()
            locations = locations_from_context(context, cfg)
            try:
                report = run_pitr(cfg, context.resources.dr.config_file, config.request(), locations, log=context.log.info)
            except PitrFailed as e:
                _store(locations, e.report.database, e.report.started_at, e.report.to_dict(), "pitr", context.log.warning)
                raise
            _store(locations, report.database, report.started_at, report.to_dict(), "pitr", context.log.info)
        context.add_output_metadata({
            "backup_id": report.backup_id, "reached_time": report.reached_time or "", "reached_lsn": report.reached_lsn or "",
            "timeline": report.timeline or 0, "rto_s": report.rto_s, "data_loss_window_s": report.data_loss_window_s or 0.0,
            "port": report.port, "data_dir": report.data_dir})
        return report.to_dict()

    @dg.op(description="The recovered cluster answers queries through its own socket and is out of recovery.")
    def validate_recovered(context: dg.OpExecutionContext, report: dict) -> dict:
        data_dir, port = Path(report["data_dir"]), report["port"]
        in_recovery = query_as_postgres(data_dir, port, "SELECT pg_is_in_recovery()")
        dbs = (query_as_postgres(data_dir, port, "SELECT string_agg(datname, ',') FROM pg_database "
                                                 "WHERE NOT datistemplate") or "").split(",")
        if in_recovery != "f":
            raise dg.Failure(description=f"the recovered cluster on port {port} is not a promoted primary "
                                         f"(pg_is_in_recovery: {in_recovery!r})")
        context.add_output_metadata({"databases": ", ".join(dbs), "warnings": "; ".join(report.get("warnings") or [])})
        return report

    @dg.job(name="point_in_time_recovery", tags={"dr/operation": "pitr"},
            description="Point-in-time recovery into a new data directory and port (SoundHash 'Accidental data deletion').")
    def point_in_time_recovery():
        validate_recovered(recover_to_point())

    return point_in_time_recovery


def run_pitr_drill(cfg: DrConfig, config_file: Optional[str], db: str, locations, log) -> dict:
    """Latest base backup + all WAL into a scratch directory: proves PITR works and measures it."""
    root = Path(tempfile.mkdtemp(prefix=f"dr-pitr-test-{db}-", dir=cfg.databases[db].scratch_dir or "/var/tmp"))
    root.chmod(0o755)
    data_dir = root / "data"
    try:
        report = run_pitr(cfg, config_file, PitrRequest(db, data_dir, free_port()), locations, log=log)
        reached = datetime.fromisoformat(report.reached_time) if report.reached_time else None
        achievable_rpo = (datetime.now(timezone.utc) - reached).total_seconds() if reached else None
        return {**report.to_dict(), "achievable_rpo_s": achievable_rpo}
    finally:
        LocalCluster(data_dir, 0).stop("immediate")
        shutil.rmtree(root, ignore_errors=True)


def build_pitr_test_asset(config: DrConfig, db: str) -> dg.AssetsDefinition:
    key = pitr_test_key(db)
    rto = config.database(db).objectives.rto.total_seconds()

    @dg.asset(key=key, deps=[base_backup_key(db), wal_archive_key(db)], group_name=db, kinds={"postgres"},
              description="PITR drill: the latest base backup plus all archived WAL recovered into a scratch "
                          "directory and port, checked, timed (RTO) and removed; reports how far behind now "
                          "the recovered point is (the RPO actually achievable).",
              automation_condition=dg.AutomationCondition.eager(),
              check_specs=[dg.AssetCheckSpec(PITR_PASSED, asset=key, blocking=True,
                                             description="The drill promoted a consistent cluster within the RTO.")],
              required_resource_keys={"dr", *storage_resource_keys(config)})
    def pitr_test(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        with domain_failures():
            cfg = context.resources.dr.load()
            locations = locations_from_context(context, cfg)
            try:
                out = run_pitr_drill(cfg, context.resources.dr.config_file, db, locations, context.log.info)
                passed, why = out["promoted"] and out["rto_s"] <= rto, f"promoted in {out['rto_s']:.1f}s (RTO {rto:.0f}s)"
            except PitrFailed as e:
                out, passed, why = e.report.to_dict(), False, str(e)
            _store(locations, db, out["started_at"], {**out, "passed": passed}, "pitr_test", context.log.info)
        return dg.MaterializeResult(
            metadata={"rto_s": out.get("rto_s") or -1.0, "achievable_rpo_s": out.get("achievable_rpo_s") or -1.0,
                      "backup_id": out.get("backup_id") or "", "reached_time": out.get("reached_time") or "",
                      "passed": passed},
            check_results=[dg.AssetCheckResult(check_name=PITR_PASSED, passed=passed, description=why)])

    return pitr_test
