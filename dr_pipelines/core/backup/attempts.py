"""What every kind of backup shares: the attempt record, the manifest commit, the errors."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone

from dr_pipelines.core.config import DrConfig
from dr_pipelines.core.errors import DrError
from dr_pipelines.core.log import Log
from dr_pipelines.core.owner import owner_tag
from dr_pipelines.core.repository.manifest import (
    Manifest,
    new_backup_id,
    write_manifest,
)
from dr_pipelines.core.repository.records import RecordKind, store_json_record
from dr_pipelines.core.storage.base import Location
from dr_pipelines.core.sweep import repository_leftovers, sweep_safely


class BackupFailed(DrError):
    pass


class PartialBackup(DrError):
    """Some locations hold the backup, others failed: the backup exists, the run must still fail."""

    def __init__(self, manifest: Manifest, committed: list[str], failed: dict[str, str]):
        names = ", ".join(failed)
        super().__init__(
            f"backup {manifest.id} is stored on {', '.join(committed)} but FAILED on {names}: "
            + "; ".join(f"{k}: {v}" for k, v in failed.items())
            + f". Fix {names} and run the backup again; the copies on {', '.join(committed)} are complete."
        )
        self.manifest = manifest
        self.committed = committed
        self.failed = failed


@dataclass
class BackupResult:
    manifest: Manifest
    locations: list[str]

    @property
    def compression_ratio(self) -> float:
        stored = self.manifest.size_bytes
        return round(self.manifest.uncompressed_bytes / stored, 3) if stored else 0.0


def record_attempt(
    kind: str,
    config: DrConfig,
    database: str,
    locations: dict[str, Location],
    log: Log,
    run: Callable[..., BackupResult],
    label: str | None = None,
) -> BackupResult:
    """Take the backup, and record the attempt (success or failure) in the repository: the
    compliance report's success rate counts attempts, which a failed backup's absent manifest can't."""
    config.database(database)
    if not locations:
        raise BackupFailed("no location to write to")
    started = datetime.now(timezone.utc)
    backup_id = new_backup_id(started)
    # what killed backups of this database left behind (temp files, unfinished uploads, objects
    # without a manifest) goes first
    sweep_safely(lambda: repository_leftovers(locations, database, started), log)
    with recorded_attempt(locations, database, started, backup_id, {"kind": kind, "database": database}, log) as record:
        result = run(config, database, locations, log, started, backup_id, label)
        record.update(succeeded=True, error=None, stored_on=result.locations, size_bytes=result.manifest.size_bytes)
    return result


@contextmanager
def recorded_attempt(
    locations: dict[str, Location],
    owner: str,
    started: datetime,
    attempt_id: str,
    subject: dict[str, object],
    log: Log,
    said: Callable[[BaseException], str] = str,
) -> Iterator[dict[str, object]]:
    """An attempt (of a backup or a snapshot) recorded under `owner` before it starts, and the record
    overwritten when it ends: one killed midway leaves it unfinished, which the checks report. The
    caller records its success in the yielded record; a failure is recorded here (`said` words it,
    so a secrets set's record names no file), with the locations that hold a partial result."""
    started_at = started.isoformat()
    record: dict[str, object] = {
        **subject,
        "started_at": started_at,
        "backup_id": attempt_id,
        "host": socket.gethostname(),
        "owner": owner_tag(),
        "pid": os.getpid(),
        "finished_at": None,
    }
    store_json_record(locations, owner, RecordKind.BACKUP_ATTEMPT, started_at, record, log)
    try:
        yield record
    except BaseException as e:
        record.update(succeeded=False, error=said(e)[:2000], stored_on=getattr(e, "committed", []))
        raise
    finally:
        record["finished_at"] = datetime.now(timezone.utc).isoformat()
        store_json_record(locations, owner, RecordKind.BACKUP_ATTEMPT, started_at, record, log)


def commit_manifest(
    manifest: Manifest, locations: dict[str, Location], stored: list[str], failed: dict[str, str], log: Log
) -> BackupResult:
    """Write the manifest (the commit marker) where the objects committed; fail loudly otherwise."""
    committed: list[str] = []
    failed = dict(failed)
    for loc_name in stored:
        try:
            write_manifest(locations[loc_name], manifest)
            committed.append(loc_name)
        except Exception as e:
            failed[loc_name] = str(e)
    if not committed:
        raise BackupFailed(
            f"{manifest.kind} backup {manifest.id} failed on every location: "
            + "; ".join(f"{k}: {v}" for k, v in failed.items())
        )
    log(
        f"{manifest.kind} backup {manifest.id}: {manifest.size_bytes} bytes stored on {', '.join(committed)} "
        f"in {manifest.duration_s:.1f}s"
    )
    if failed:
        raise PartialBackup(manifest, committed, failed)
    return BackupResult(manifest, committed)
