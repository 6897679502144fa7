"""The restore report: what was restored from where, RTO, data-loss window, validation."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import datetime

from dr_pipelines.core.log import Log
from dr_pipelines.core.repository.manifest import Manifest
from dr_pipelines.core.repository.records import RecordKind, store_record
from dr_pipelines.core.restore.fetch import Fetched
from dr_pipelines.core.storage.base import Location

# --------------------------------------------------------------------------- reports


@dataclass
class RestoreReport:
    kind: RecordKind  # RESTORE or RESTORE_TEST
    database: str
    target: str
    started_at: str
    finished_at: str | None = None
    backup_id: str | None = None
    backup_created_at: str | None = None
    location: str | None = None
    fallback: bool = False
    fallback_reasons: list[str] = field(default_factory=list)
    location_failures: list[str] = field(default_factory=list)
    previous_database: str | None = None
    rto_s: float | None = None
    data_loss_window_s: float | None = None
    steps_s: dict[str, float] = field(default_factory=dict)
    validation: dict | None = None
    passed: bool = False
    error: str | None = None

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=2, sort_keys=True).encode() + b"\n"


def data_loss_window(manifest: Manifest | None, started: datetime) -> float | None:
    return None if manifest is None else round((started - manifest.created_at).total_seconds(), 3)


def store_report(locations: dict[str, Location], report: RestoreReport, log: Log) -> list[str]:
    """Reports live in the repository too, so history survives the loss of the Dagster instance."""
    return store_record(locations, report.database, report.kind, report.started_at, report.to_json(), log)


def describe_backup(report: RestoreReport, fetched: Fetched, started: datetime) -> None:
    m = fetched.manifest
    report.backup_id = m.id if m else None
    report.backup_created_at = m.created_at.isoformat() if m else None
    report.location = fetched.location
    report.fallback = bool(fetched.fallback_reasons)
    report.fallback_reasons = fetched.fallback_reasons
    report.location_failures = fetched.location_failures
    report.data_loss_window_s = data_loss_window(m, started)
