"""Physical base backup: `pg_basebackup -Ft -D -` streamed through compress / encrypt / hash to every
location, PostgreSQL's own `backup_manifest` kept inside the tar.

The start and stop LSN and timeline come from that manifest's WAL-Ranges (read from the stream as it
passes, no copy on disk). The backup is complete only when every WAL segment from start to stop is
in the archive: we wait for it (wal.archive_wait), then write our manifest, the commit marker. If the
WAL never arrives the run fails loudly and the backup stays invisible (its objects are removed).
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections import deque
from datetime import datetime, timezone
from typing import Any

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
    connect,
    libpq_env,
    pg_tool,
    server_facts,
    tool_version,
)
from dr_pipelines.core.postgres.wal_names import (
    lsn_to_segment,
    parse_segment,
    segment_name,
)
from dr_pipelines.core.repository.manifest import Manifest, ManifestObject
from dr_pipelines.core.storage.base import Location, LocationError
from dr_pipelines.core.storage.fanout import stream_to_locations

BLOCK = 512


class TarWatcher:
    """Reads a tar stream passing through and keeps the few small members we need (ustar headers,
    as pg_basebackup writes them). Content bytes are stepped over, never copied: only headers
    (512 bytes) are buffered, and only the wanted members are kept."""

    def __init__(self, src: Any, wanted: set[str]):
        self._src = src
        self._wanted = wanted
        self._header = bytearray()  # a header split across reads
        self._skip = 0  # content bytes (padded) still to pass before the next header
        self._capture: tuple[str, int] | None = None
        self.members: dict[str, bytearray] = {}
        self.last_data = time.monotonic()

    def read(self, size: int = -1) -> bytes:
        data = self._src.read(size)
        self._feed(memoryview(data))
        return data

    def readinto(self, b) -> int:
        n = self._src.readinto(b)
        if n:
            self._feed(memoryview(b)[:n])
        return n

    def _feed(self, view: memoryview) -> None:
        self.last_data = time.monotonic()
        pos, end = 0, len(view)
        while pos < end:
            if self._skip:
                take = min(self._skip, end - pos)
                if self._capture:
                    name, size = self._capture
                    keep = max(0, min(take, size - len(self.members[name])))
                    self.members[name] += view[pos : pos + keep]
                pos += take
                self._skip -= take
                if not self._skip:
                    self._capture = None
                continue
            take = min(BLOCK - len(self._header), end - pos)
            self._header += view[pos : pos + take]
            pos += take
            if len(self._header) == BLOCK:
                self._start_member(bytes(self._header))
                self._header.clear()

    def _start_member(self, header: bytes) -> None:
        if header == b"\0" * BLOCK:
            return
        name = header[:100].rstrip(b"\0").decode(errors="replace")
        prefix = header[345:500].rstrip(b"\0").decode(errors="replace")
        if prefix:
            name = f"{prefix}/{name}"
        field = header[124:136]
        if field[0] & 0x80:  # GNU base-256, for members of 8 GiB and more
            size = int.from_bytes(field[1:], "big")
        else:
            size = int(field.rstrip(b"\0 ").decode() or "0", 8)
        self._skip = (size + BLOCK - 1) // BLOCK * BLOCK
        self._capture = (name, size) if name in self._wanted else None
        if self._capture:
            self.members[name] = bytearray()


def wal_range(backup_manifest: bytes) -> dict:
    """Start on the first range's timeline, stop on the last's (several ranges: the timeline
    switched during the backup, on a standby being promoted; the wait then checks the last range)."""
    ranges = json.loads(backup_manifest)["WAL-Ranges"]
    first, last = ranges[0], ranges[-1]
    return {
        "timeline": last["Timeline"],
        "start_lsn": first["Start-LSN"] if len(ranges) == 1 else last["Start-LSN"],
        "stop_lsn": last["End-LSN"],
        "ranges": ranges,
    }


def missing_wal(locations: dict[str, Location], database: str, names: list[str]) -> list[str]:
    """The segments no location holds yet (by their sidecar, the commit marker). Asks for exactly
    these objects: listing and reading the whole archive on every poll would not scale."""
    from dr_pipelines.core.postgres.wal_names import timeline_of
    from dr_pipelines.core.wal.archive import wal_prefix

    def archived(name: str) -> bool:
        key = f"{wal_prefix(database)}/{timeline_of(name)}/{name}.json"
        for loc in locations.values():
            try:
                if loc.size(key) is not None:
                    return True
            except LocationError:
                continue
        return False

    return [n for n in names if not archived(n)]


def wait_for_wal(
    config: DrConfig, database: str, locations: dict[str, Location], rng: dict, segment_size: int, log: Log
) -> None:
    first = lsn_to_segment(rng["start_lsn"], rng["timeline"], segment_size)
    last = lsn_to_segment(rng["stop_lsn"], rng["timeline"], segment_size, end=True)
    lo, hi = parse_segment(first, segment_size)[1], parse_segment(last, segment_size)[1]
    missing = [segment_name(rng["timeline"], i, segment_size) for i in range(lo, hi + 1)]
    deadline = time.monotonic() + config.wal.archive_wait.total_seconds()
    while True:
        missing = missing_wal(locations, database, missing)  # what was found stays found
        if not missing:
            log(f"WAL {first} .. {last} is archived: the base backup is consistent")
            return
        if time.monotonic() > deadline:
            raise BackupFailed(
                f"base backup of {database!r} is not usable: WAL {', '.join(missing[:5])}"
                f"{' ...' if len(missing) > 5 else ''} was not archived within {config.wal.archive_wait}. "
                f"Is archiving on? Run `dr-pipelines pg-config {database}` and check pg_stat_archiver"
                + (
                    f"; is `dr-pipelines wal-stream {database}` running?"
                    if config.database(database).streaming.enabled
                    else ""
                )
            )
        time.sleep(0.5)


def _next_xid(db, database: str) -> str | None:
    """The next transaction id, read after the backup ended: a transaction with this id or later
    commits after the backup is consistent, so PITR to it can start from this backup."""
    try:
        with connect(db, database) as conn:
            # an id assigned now: every later transaction is assigned (and commits) after the backup
            # ended. (pg_snapshot_xmax would not do: an xid whose commit is in WAL can still be running.)
            return conn.execute("SELECT pg_current_xact_id()::text").fetchone()[0]
    except Exception:  # a standby, or no connection: PITR to an xid then tries this backup anyway
        return None


def run_base_backup(
    config: DrConfig,
    database: str,
    locations: dict[str, Location],
    log: Log = lambda msg: None,
    label: str | None = None,
) -> BackupResult:
    return record_attempt("base", config, database, locations, log, _run, label)


def _run(
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
    with connect(db, database) as conn:
        facts = server_facts(conn)
        segment_size = int(
            conn.execute("SELECT setting FROM pg_settings WHERE name = 'wal_segment_size'").fetchone()[0]
        )
        archiving = conn.execute("SELECT current_setting('archive_mode')").fetchone()[0]
        tablespaces = [
            r[0]
            for r in conn.execute(
                "SELECT spcname FROM pg_tablespace WHERE spcname NOT IN ('pg_default', 'pg_global') ORDER BY 1"
            )
        ]
    if tablespaces:  # pg_basebackup -D - streams the main data directory's tar only
        raise BackupFailed(
            f"{db.host}:{db.port} has tablespaces outside the data directory "
            f"({', '.join(tablespaces)}): base backups of such clusters are not supported yet, "
            "nothing was stored. Logical backups of its databases still work"
        )
    if archiving == "off" and not db.streaming.enabled:  # with streaming, wal-stream archives the WAL
        raise BackupFailed(
            f"archive_mode is off on {db.host}:{db.port}: a base backup without archived WAL "
            f"cannot be restored. Run `dr-pipelines pg-config {database}` and restart PostgreSQL"
        )
    tool = pg_tool("pg_basebackup", db, facts["server_major"])
    name = "base.tar" + object_suffix(config.compression.method, config.encryption.method)
    key = f"{database}/base/{backup_id}/{name}"
    log(
        f"base backup {backup_id}: pg_basebackup of {db.host}:{db.port} -> "
        + ", ".join(loc.url(key) for loc in locations.values())
    )
    cmd = [
        tool,
        "-D",
        "-",
        "-Ft",
        "-X",
        "none",
        "--checkpoint=fast",
        "--manifest-checksums=SHA256",
        "--no-password",
        "--label",
        f"dr_pipelines {backup_id}",
    ]
    env = libpq_env(db, database)
    env.pop("PGDATABASE", None)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, bufsize=0)
    stderr: deque = deque(maxlen=20)
    reader = threading.Thread(
        target=lambda: [stderr.append(ln.decode(errors="replace").rstrip()) for ln in proc.stderr], daemon=True
    )
    reader.start()
    assert proc.stdout is not None
    watcher = TarWatcher(proc.stdout, {"backup_manifest", "backup_label"})
    source = CountingReader(watcher)
    # With -X none the server ends the backup only once its last WAL segment is archived; if
    # archiving is broken the stream stalls there. A stall longer than wal.archive_wait ends it.
    stalled = threading.Event()

    def watchdog():
        limit = config.wal.archive_wait.total_seconds()
        while proc.poll() is None:
            if time.monotonic() - watcher.last_data > limit:
                stalled.set()
                proc.kill()
                return
            time.sleep(0.2)

    threading.Thread(target=watchdog, daemon=True).start()

    def check_tool():
        rc = proc.wait()
        reader.join(timeout=5)
        if stalled.is_set():
            raise BackupFailed(
                f"base backup of {database!r} is not usable: PostgreSQL waited more than {config.wal.archive_wait} "
                f"for its WAL to be archived (archive_command failing?). Run `dr-pipelines pg-config {database}` "
                f"and check pg_stat_archiver. pg_basebackup said: {' | '.join(ln for ln in stderr if ln) or '-'}"
            )
        if rc != 0:
            raise BackupFailed(
                f"pg_basebackup of {database!r} failed (exit {rc}); nothing was stored. "
                f"It said: {' | '.join(ln for ln in stderr if ln) or '(nothing)'}"
            )
        if "backup_manifest" not in watcher.members:
            raise BackupFailed("pg_basebackup wrote no backup_manifest into the tar stream")

    try:
        result = stream_to_locations(
            source, list(locations.values()), key, config.compression, config.encryption, before_commit=check_tool
        )
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stopped = datetime.now(timezone.utc)
    next_xid = _next_xid(db, database)
    rng = wal_range(bytes(watcher.members["backup_manifest"]))
    try:
        wait_for_wal(config, database, locations, rng, segment_size, log)
    except BackupFailed:
        for loc_name in result.committed:  # not a backup: leave nothing that looks like one
            try:
                locations[loc_name].delete(key)
            except LocationError:
                pass
        raise
    manifest = Manifest(
        id=backup_id,
        label=label,
        kind="base",
        database=database,
        dbname=db.dbname,
        created_at=started,
        finished_at=datetime.now(timezone.utc),
        duration_s=round(time.monotonic() - t0, 3),
        server_version=facts["server_version"],
        system_identifier=facts["system_identifier"],
        tool="pg_basebackup",
        tool_version=tool_version(tool),
        dump_format="tar",
        compression={"method": config.compression.method, "level": config.compression.level},
        encryption={"method": config.encryption.method, "recipients": recipient_fingerprints(config.encryption)},
        objects=[ManifestObject(name=name, size=result.size, sha256=result.sha256)],
        uncompressed_bytes=source.bytes,
        extra={
            **rng,
            "stopped_at": stopped.isoformat(),
            "segment_size": segment_size,
            "wal_start": lsn_to_segment(rng["start_lsn"], rng["timeline"], segment_size),
            "wal_stop": lsn_to_segment(rng["stop_lsn"], rng["timeline"], segment_size, end=True),
            "backup_label": bytes(watcher.members.get("backup_label", b"")).decode(errors="replace"),
            "next_xid_after": next_xid,
        },
    )
    log(
        f"base backup {backup_id}: WAL {manifest.base.wal_start} .. {manifest.base.wal_stop} "
        f"on timeline {rng['timeline']}"
    )
    return commit_manifest(manifest, locations, result.committed, result.failed, log)
