"""The PITR drill: the latest base backup plus all archived WAL recovered into a scratch directory
and port, timed and removed; it proves PITR works and measures the RTO and the achievable RPO.
Its record is stored in the repository (kind `pitr_test`), like every recovery's."""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from dr_pipelines.core.config import DrConfig
from dr_pipelines.core.log import Log
from dr_pipelines.core.owner import owner_tag
from dr_pipelines.core.pitr.recover import PitrFailed, PitrReport, PitrRequest, run_pitr
from dr_pipelines.core.postgres.cluster import LocalCluster, free_port
from dr_pipelines.core.repository.records import RecordKind, store_json_record
from dr_pipelines.core.storage.base import Location
from dr_pipelines.core.sweep import DRILL_PREFIX, OWNER_FILE


@dataclass
class DrillResult:
    report: PitrReport
    passed: bool
    why: str
    achievable_rpo_s: float | None = None

    def record(self) -> dict:
        return {**self.report.to_dict(), "achievable_rpo_s": self.achievable_rpo_s, "passed": self.passed}


def run_pitr_drill(
    config: DrConfig, config_file: str, db: str, locations: dict[str, Location], log: Log
) -> DrillResult:
    """Passed: the drill promoted a consistent cluster within the database's RTO."""
    rto = config.database(db).objectives.rto.total_seconds()
    root = Path(tempfile.mkdtemp(prefix=f"{DRILL_PREFIX}{db}-", dir=config.databases[db].scratch_dir or "/var/tmp"))
    root.chmod(0o755)  # the recovered cluster runs as postgres
    (root / OWNER_FILE).write_text(owner_tag())  # a drill killed midway is swept by the next run
    data_dir = root / "data"
    try:
        report = run_pitr(config, config_file, PitrRequest(db, data_dir, free_port()), locations, log=log)
        reached = datetime.fromisoformat(report.reached_time) if report.reached_time else None
        rpo = (datetime.now(timezone.utc) - reached).total_seconds() if reached else None
        rto_s = report.rto_s or 0.0
        result = DrillResult(
            report, report.promoted and rto_s <= rto, f"promoted in {rto_s:.1f}s (RTO {rto:.0f}s)", rpo
        )
    except PitrFailed as e:
        result = DrillResult(e.report, False, str(e))
    finally:
        LocalCluster(data_dir, 0).stop("immediate")
        shutil.rmtree(root, ignore_errors=True)
    store_json_record(locations, db, RecordKind.PITR_TEST, result.report.started_at, result.record(), log)
    return result
