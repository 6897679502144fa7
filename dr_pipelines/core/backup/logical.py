"""Logical backup: pg_dump -Fc streamed through compress / encrypt / hash to every location.

The dump runs in a snapshot exported by our own transaction, so the row counts and schema
fingerprint recorded in the manifest describe exactly what was dumped. The object is committed
only after pg_dump exits 0; then the manifest is written on each location that holds the object.
If a location fails, the others keep their complete backups and the error names the location.
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections import deque
from datetime import datetime, timezone

from dr_pipelines.core.backup.attempts import (
    BackupFailed,
    BackupResult,
    commit_manifest,
    record_attempt,
)
from dr_pipelines.core.codec.encode import CountingReader
from dr_pipelines.core.codec.keys import recipient_fingerprints
from dr_pipelines.core.codec.methods import object_suffix
from dr_pipelines.core.config import DrConfig
from dr_pipelines.core.log import Log
from dr_pipelines.core.postgres.client import (
    SnapshotSession,
    libpq_env,
    pg_tool,
    schema_fingerprint,
    server_facts,
    table_rows_and_bytes,
    tool_version,
)
from dr_pipelines.core.repository.manifest import (
    Manifest,
    ManifestObject,
)
from dr_pipelines.core.storage.base import Location
from dr_pipelines.core.storage.fanout import stream_to_locations


def _tail_stderr(proc: subprocess.Popen, lines: deque) -> threading.Thread:
    def run():
        for raw in proc.stderr:
            lines.append(raw.decode(errors="replace").rstrip())

    t = threading.Thread(target=run, name="pg_dump-stderr", daemon=True)
    t.start()
    return t


def run_logical_backup(
    config: DrConfig,
    database: str,
    locations: dict[str, Location],
    log: Log = lambda msg: None,
    label: str | None = None,
) -> BackupResult:
    return record_attempt("logical", config, database, locations, log, _run_logical_backup, label)


def _run_logical_backup(
    config: DrConfig,
    database: str,
    locations: dict[str, Location],
    log: Log,
    started: datetime,
    backup_id: str,
    label: str | None = None,
) -> BackupResult:
    db = config.database(database)
    t0 = time.monotonic()

    session = SnapshotSession(db, database)  # raises DatabaseUnreachable with a clear message
    describer = None
    try:
        facts = server_facts(session.conn)
        pg_dump = pg_tool("pg_dump", db, facts["server_major"])
        name = "dump.pgdump" + object_suffix(config.compression.method, config.encryption.method)
        key = f"{database}/logical/{backup_id}/{name}"
        log(
            f"backup {backup_id}: pg_dump of {db.dbname} on {db.host}:{db.port} -> "
            + ", ".join(loc.url(key) for loc in locations.values())
        )

        cmd = [
            pg_dump,
            "--format=custom",
            "--compress=0",
            f"--snapshot={session.snapshot_id}",
            "--no-password",
            db.dbname,
        ]
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=libpq_env(db, database), bufsize=0
        )
        stderr: deque = deque(maxlen=20)
        stderr_thread = _tail_stderr(proc, stderr)

        # Counting rows in the same snapshot runs beside the dump, on its own connection.
        facts_box: dict = {}

        def describe():
            try:
                facts_box["tables"], facts_box["table_bytes"] = table_rows_and_bytes(session.conn)
                facts_box["schema_fingerprint"] = schema_fingerprint(session.conn)
            except BaseException as e:
                facts_box["error"] = e

        describer = threading.Thread(target=describe, name="describe-snapshot", daemon=True)
        describer.start()

        assert proc.stdout is not None
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
            result = stream_to_locations(
                source, list(locations.values()), key, config.compression, config.encryption, before_commit=check_dump
            )
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
        label=label,
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
        encryption={"method": config.encryption.method, "recipients": recipient_fingerprints(config.encryption)},
        objects=[ManifestObject(name=name, size=result.size, sha256=result.sha256)],
        uncompressed_bytes=source.bytes,
        tables=facts_box["tables"],
        table_bytes=facts_box["table_bytes"],
        schema_fingerprint=facts_box["schema_fingerprint"],
    )
    # The manifest goes last, and only where the object committed: it is the commit marker.
    return commit_manifest(manifest, locations, result.committed, result.failed, log)
