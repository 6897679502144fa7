"""Logical backup: pg_dump -Fc streamed through compress / encrypt / hash to every location.

The dump runs in a snapshot exported by our own transaction, so the row counts and schema
fingerprint recorded in the manifest describe exactly what was dumped. The object is committed
only after pg_dump exits 0; then the manifest is written on each location that holds the object.
If a location fails, the others keep their complete backups and the error names the location.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections import deque
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable

from dr_pipelines.core.config import DrConfig
from dr_pipelines.core.postgres import (
    SnapshotSession,
    libpq_env,
    pg_tool,
    schema_fingerprint,
    server_facts,
    table_row_counts,
    tool_version,
)
from dr_pipelines.core.repository import Manifest, ManifestObject, new_backup_id, store_record, write_manifest
from dr_pipelines.core.storage import Location
from dr_pipelines.core.streams import CountingReader, object_suffix, recipient_fingerprints, stream_to_locations

Log = Callable[[str], None]


class BackupFailed(RuntimeError):
    pass


class PartialBackup(RuntimeError):
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


def _tail_stderr(proc: subprocess.Popen, lines: deque) -> threading.Thread:
    def run():
        for raw in proc.stderr:
            lines.append(raw.decode(errors="replace").rstrip())

    t = threading.Thread(target=run, name="pg_dump-stderr", daemon=True)
    t.start()
    return t


ATTEMPTS = "backup_attempt"


def run_logical_backup(config: DrConfig, database: str, locations: dict[str, Location],
                       log: Log = lambda msg: None) -> BackupResult:
    return record_attempt("logical", config, database, locations, log, _run_logical_backup)


def record_attempt(kind: str, config: DrConfig, database: str, locations: dict[str, Location], log: Log,
                   run: Callable[..., "BackupResult"]) -> "BackupResult":
    """Take the backup, and record the attempt (success or failure) in the repository: the
    compliance report's success rate counts attempts, which a failed backup's absent manifest can't."""
    config.database(database)
    if not locations:
        raise BackupFailed("no location to write to")
    started = datetime.now(timezone.utc)
    backup_id = new_backup_id(started)
    record = {"kind": kind, "database": database, "started_at": started.isoformat(), "backup_id": backup_id}
    try:
        result = run(config, database, locations, log, started, backup_id)
    except BaseException as e:
        stored_on = e.committed if isinstance(e, PartialBackup) else []
        record.update(succeeded=False, error=str(e)[:2000], stored_on=stored_on)
        raise
    else:
        record.update(succeeded=True, error=None, stored_on=result.locations, size_bytes=result.manifest.size_bytes)
        return result
    finally:
        record["finished_at"] = datetime.now(timezone.utc).isoformat()
        store_record(locations, database, ATTEMPTS, record["started_at"],
                     json.dumps(record, sort_keys=True).encode(), log)


def commit_manifest(manifest: Manifest, locations: dict[str, Location], stored: list[str],
                    failed: dict[str, str], log: Log) -> BackupResult:
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
        raise BackupFailed(f"{manifest.kind} backup {manifest.id} failed on every location: "
                           + "; ".join(f"{k}: {v}" for k, v in failed.items()))
    log(f"{manifest.kind} backup {manifest.id}: {manifest.size_bytes} bytes stored on {', '.join(committed)} "
        f"in {manifest.duration_s:.1f}s")
    if failed:
        raise PartialBackup(manifest, committed, failed)
    return BackupResult(manifest, committed)


def _run_logical_backup(config: DrConfig, database: str, locations: dict[str, Location], log: Log,
                        started: datetime, backup_id: str) -> BackupResult:
    db = config.database(database)
    t0 = time.monotonic()

    session = SnapshotSession(db, database)  # raises DatabaseUnreachable with a clear message
    describer = None
    try:
        facts = server_facts(session.conn)
        pg_dump = pg_tool("pg_dump", db, facts["server_major"])
        name = "dump.pgdump" + object_suffix(config.compression, config.encryption)
        key = f"{database}/logical/{backup_id}/{name}"
        log(f"backup {backup_id}: pg_dump of {db.dbname} on {db.host}:{db.port} -> "
            + ", ".join(loc.url(key) for loc in locations.values()))

        cmd = [pg_dump, "--format=custom", "--compress=0", f"--snapshot={session.snapshot_id}",
               "--no-password", db.dbname]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env=libpq_env(db, database), bufsize=0)
        stderr: deque = deque(maxlen=20)
        stderr_thread = _tail_stderr(proc, stderr)

        # Counting rows in the same snapshot runs beside the dump, on its own connection.
        facts_box: dict = {}

        def describe():
            try:
                facts_box["tables"] = table_row_counts(session.conn)
                facts_box["schema_fingerprint"] = schema_fingerprint(session.conn)
            except BaseException as e:
                facts_box["error"] = e

        describer = threading.Thread(target=describe, name="describe-snapshot", daemon=True)
        describer.start()

        source = CountingReader(proc.stdout)

        def check_dump():
            rc = proc.wait()
            stderr_thread.join(timeout=5)
            if rc != 0:
                raise BackupFailed(
                    f"pg_dump of database {database!r} failed (exit {rc}); nothing was stored. "
                    f"pg_dump said: {' | '.join(stderr) or '(nothing)'}"
                )
            describer.join()
            if "error" in facts_box:
                raise BackupFailed(f"could not record row counts of {database!r}: {facts_box['error']}")

        try:
            result = stream_to_locations(source, list(locations.values()), key, config.compression,
                                         config.encryption, before_commit=check_dump)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    finally:
        # The describer may still be inside a transaction on the session's connection (the dump
        # failed first); closing under it would race, so let it finish.
        if describer is not None:
            describer.join()
        session.close()

    finished = datetime.now(timezone.utc)
    manifest = Manifest(
        id=backup_id,
        kind="logical",
        database=database,
        dbname=db.dbname,
        created_at=started,
        finished_at=finished,
        duration_s=round(time.monotonic() - t0, 3),
        server_version=facts["server_version"],
        system_identifier=facts["system_identifier"],
        tool="pg_dump",
        tool_version=tool_version(pg_dump),
        dump_format="custom",
        compression={"method": config.compression.method, "level": config.compression.level},
        encryption={"method": config.encryption.method,
                    "recipients": recipient_fingerprints(config.encryption)},
        objects=[ManifestObject(name=name, size=result.size, sha256=result.sha256)],
        uncompressed_bytes=source.bytes,
        tables=facts_box["tables"],
        schema_fingerprint=facts_box["schema_fingerprint"],
    )
    # The manifest goes last, and only where the object committed: it is the commit marker.
    return commit_manifest(manifest, locations, result.committed, result.failed, log)
