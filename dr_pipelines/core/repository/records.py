"""Records (attempts, restore tests, PITR drills, reports) stored in the repository beside the backups,
so history survives the loss of the Dagster instance."""

from __future__ import annotations

import json
from enum import StrEnum

from pydantic import BaseModel, ConfigDict

from dr_pipelines.core.log import Log
from dr_pipelines.core.owner import owner_dead
from dr_pipelines.core.storage.base import Location, LocationError

# --------------------------------------------------------------------------- history records
# Reports of restores, restore tests and backup attempts: small JSON objects under
# <database>/reports/<kind>/<started_at>.json, on every location that accepts them.


class RecordKind(StrEnum):
    """The kinds of record, each under `<database>/reports/<kind>/` in the repository."""

    BACKUP_ATTEMPT = "backup_attempt"  # every backup attempt, success or failure
    RESTORE = "restore"  # a real restore
    RESTORE_TEST = "restore_test"  # a restore drill into a scratch database
    PITR = "pitr"  # a real point-in-time recovery
    PITR_TEST = "pitr_test"  # a PITR drill
    RECOVERY = "recovery"  # a whole-system scenario (full system, failover, ransomware, rollback)
    RECOVERY_DRILL = "recovery_drill"  # the scheduled full-system drill


class Record(BaseModel):
    """What the readers of records rely on; each kind stores more (kept as extra fields)."""

    model_config = ConfigDict(extra="allow")
    started_at: str
    backup_id: str | None = None
    backup_created_at: str | None = None
    kind: str | None = None  # backup attempts: logical or base; reports: their own kind
    succeeded: bool = False  # backup attempts
    passed: bool = False  # restores, drills
    error: str | None = None
    rto_s: float | None = None
    achievable_rpo_s: float | None = None
    finished_at: str | None = None  # None: still running, or its process died (host and pid say which)
    host: str | None = None
    pid: int | None = None
    owner: str | None = None  # host:pid:boot:start (core.owner)

    def died(self) -> bool:
        """Unfinished, and its process is gone (on this host we can tell; elsewhere, after a day)."""
        from datetime import datetime, timedelta, timezone

        if self.finished_at is not None or self.host is None:
            return False
        dead = owner_dead(self.owner or f"{self.host}:{self.pid}")
        if dead is None:
            return datetime.now(timezone.utc) - datetime.fromisoformat(self.started_at) > timedelta(days=1)
        return dead

    def known_dead(self) -> bool:
        """Unfinished, and its process is known to be gone (this host can tell; of another host's,
        nothing is known: what it left is removed only after the sweep's grace period)."""
        return (
            self.finished_at is None
            and self.host is not None
            and owner_dead(self.owner or f"{self.host}:{self.pid}") is True
        )

    def running(self) -> bool:
        return self.finished_at is None and self.host is not None and not self.died()


def store_record(
    locations: dict[str, Location],
    database: str,
    kind: RecordKind,
    started_at: str,
    data: bytes,
    log: Log = lambda msg: None,
) -> list[str]:
    key = f"{database}/reports/{kind}/{started_at.replace(':', '')}.json"
    stored = []
    for name, loc in locations.items():
        try:
            loc.put_bytes(key, data)
            stored.append(name)
        except LocationError as e:
            log(f"warning: could not store the {kind} record on {name}: {e}")
    return stored


def store_json_record(
    locations: dict[str, Location],
    database: str,
    kind: RecordKind,
    started_at: str,
    record: dict,
    log: Log = lambda msg: None,
) -> list[str]:
    return store_record(
        locations, database, kind, started_at, json.dumps(record, sort_keys=True, default=str).encode(), log
    )


def load_reports(locations: dict[str, Location], database: str, kind: RecordKind) -> list[Record]:
    """Records of one kind, newest first, merged across locations."""
    seen: dict[str, Record] = {}
    for loc in locations.values():
        try:
            keys = [obj.key for obj in loc.list(f"{database}/reports/{kind}/") if obj.key.endswith(".json")]
        except LocationError:
            continue
        for key in keys:
            if key in seen and seen[key].finished_at is not None:
                continue  # a finished copy wins over an unfinished one (the end was not written everywhere)
            try:
                seen[key] = Record.model_validate_json(loc.get_bytes(key))
            except (LocationError, ValueError):
                continue  # one unreadable record (a flipped bit) hides no other; another location may hold it
    return sorted(seen.values(), key=lambda r: r.started_at, reverse=True)
