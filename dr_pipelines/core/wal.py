"""The WAL archive: `wal-push` (PostgreSQL's archive_command) and `wal-fetch` (its restore_command).

Layout on every location (the sidecar is written after the object: it is the commit marker)::

    <database>/wal/<timeline>/<file name><.zst><.age>     the file, compressed and encrypted
    <database>/wal/<timeline>/<file name>.json           its size and SHA-256 (plain and stored),
                                                          the cluster's system identifier
    <database>/wal/cluster.json                           the system identifier this archive belongs to

The rules PostgreSQL needs (docs, and pgBackRest's behaviour):
  - push exits 0 only when the file is durable on every location; the same name pushed again with
    the same content succeeds, with different content fails (never overwrite archived WAL);
  - a segment whose header names another cluster is refused;
  - fetch exits 1 only when the file exists nowhere; a transient error is retried and then aborts
    recovery (exit > 125), because PostgreSQL reads exit 1..125 as "not found" and would end
    recovery early; a corrupt copy is skipped for a good one, and if none is good recovery aborts.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import struct
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import zstandard

from dr_pipelines.core.config import DrConfig
from dr_pipelines.core.durable import write_atomically
from dr_pipelines.core.storage import Location, LocationError, ObjectNotFound

SEGMENT = re.compile(r"^[0-9A-F]{24}$")
HISTORY = re.compile(r"^[0-9A-F]{8}\.history$")
BACKUP_LABEL = re.compile(r"^[0-9A-F]{24}\.[0-9A-F]{8}\.backup$")
PARTIAL = re.compile(r"^[0-9A-F]{24}\.partial$")
CLUSTER = "cluster.json"
XLP_LONG_HEADER = 0x0002

Log = Callable[[str], None]


class WalError(RuntimeError):
    """wal-push failed: PostgreSQL keeps the file and retries; nothing archived was changed."""


class WalRefused(WalError):
    """The file must not be archived here (another cluster, or different content under a known name)."""


class WalNotFound(LookupError):
    """The file exists on no location: the only case restore_command may exit 1."""


class WalFetchAborted(RuntimeError):
    """Transient errors or only corrupt copies: recovery must stop rather than end early."""


def wal_prefix(database: str) -> str:
    return f"{database}/wal"


def timeline_of(name: str) -> str:
    return name[:8]


def _classify(name: str) -> str:
    for kind, rx in (("segment", SEGMENT), ("history", HISTORY), ("backup", BACKUP_LABEL), ("partial", PARTIAL)):
        if rx.match(name):
            return kind
    raise WalRefused(f"{name!r} is not a WAL segment, .history, .backup or .partial file name; "
                     "archive_command must pass %p")


def segment_header(data: bytes) -> dict:
    """The long page header at the start of every segment: timeline, system id, segment size."""
    if len(data) < 40:
        raise WalRefused(f"segment is {len(data)} bytes: too short to be WAL")
    magic, info, tli, pageaddr = struct.unpack_from("<HHIQ", data, 0)
    if not info & XLP_LONG_HEADER:
        raise WalRefused("segment does not start with a long page header: not a WAL segment")
    sysid, seg_size, blcksz = struct.unpack_from("<QII", data, 24)
    return {"timeline": tli, "system_identifier": str(sysid), "segment_size": seg_size, "magic": magic}


def object_name(name: str, config: DrConfig) -> str:
    suffix = {"zstd": ".zst", "gzip": ".gz", "none": ""}[config.compression.method]
    return name + suffix + (".age" if config.encryption.method == "age" else "")


def encode(data: bytes, config: DrConfig) -> bytes:
    c = config.compression
    if c.method == "zstd":
        data = zstandard.ZstdCompressor(level=c.level).compress(data)
    elif c.method == "gzip":
        data = gzip.compress(data, compresslevel=c.level, mtime=0)
    if config.encryption.method == "age":
        import pyrage

        from dr_pipelines.core.streams import age_recipients

        data = pyrage.encrypt(data, age_recipients(config.encryption))
    return data


def decode(data: bytes, side: dict, identities: list | None) -> bytes:
    if side["encryption"] == "age":
        import pyrage

        if not identities:
            raise WalFetchAborted("the WAL archive is age-encrypted and no identity is configured "
                                  "(encryption.identity_file or identity_file_env)")
        data = pyrage.decrypt(data, identities)
    if side["compression"] == "zstd":
        data = zstandard.ZstdDecompressor().decompress(data, max_output_size=1 << 31)
    elif side["compression"] == "gzip":
        data = gzip.decompress(data)
    return data


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _read_json(loc: Location, key: str) -> dict | None:
    try:
        return json.loads(loc.get_bytes(key))
    except ObjectNotFound:
        return None


def archive_cluster(locations: dict[str, Location], database: str) -> dict | None:
    """The cluster the archive belongs to, from the first location that records it."""
    for loc in locations.values():
        try:
            record = _read_json(loc, f"{wal_prefix(database)}/{CLUSTER}")
        except LocationError:
            continue
        if record:
            return record
    return None


@dataclass
class PushResult:
    name: str
    stored: list[str] = field(default_factory=list)  # newly written
    already: list[str] = field(default_factory=list)  # identical copy was there


def wal_push(config: DrConfig, database: str, path: str | Path, locations: dict[str, Location],
             log: Log = lambda m: None) -> PushResult:
    path = Path(path)
    name = path.name
    kind = _classify(name)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise WalError(f"cannot read {path}: {e.strerror}") from None
    side = {"name": name, "kind": kind, "size": len(data), "sha256": _sha(data),
            "compression": config.compression.method, "encryption": config.encryption.method,
            "pushed_at": datetime.now(timezone.utc).isoformat()}
    known = archive_cluster(locations, database)
    if kind == "segment":
        header = segment_header(data)
        side.update(system_identifier=header["system_identifier"], segment_size=header["segment_size"])
        if known and known["system_identifier"] != header["system_identifier"]:
            raise WalRefused(
                f"{name} comes from cluster {header['system_identifier']}, but the WAL archive of {database!r} "
                f"belongs to cluster {known['system_identifier']}; refusing to mix them. If this cluster "
                "replaced the old one on purpose, archive it under another database name")
    prefix = f"{wal_prefix(database)}/{timeline_of(name)}"
    result, failures = PushResult(name), []
    # Look everywhere before writing anywhere: a conflict on one location must not leave the new
    # bytes on another (two different copies of one segment).
    missing: list[str] = []
    for loc_name, loc in locations.items():
        try:
            existing = _read_json(loc, f"{prefix}/{name}.json")
        except (LocationError, ValueError) as e:
            failures.append(f"{loc_name}: {e}")
            continue
        if existing is None:
            missing.append(loc_name)
        elif existing["sha256"] != side["sha256"]:
            raise WalRefused(
                f"{name} is already archived on {loc_name} with different content "
                f"(sha256 {existing['sha256'][:12]}... vs {side['sha256'][:12]}...); refusing to "
                "overwrite archived WAL. Two clusters may be archiving to the same place")
        else:
            result.already.append(loc_name)
    if missing:  # compress and encrypt only when some location lacks the file (not on a re-push)
        stored_obj = encode(data, config)
        side["object"] = {"name": object_name(name, config), "size": len(stored_obj), "sha256": _sha(stored_obj)}
    for loc_name in missing:
        loc = locations[loc_name]
        try:
            if kind == "segment" and known is None:
                loc.put_bytes(f"{wal_prefix(database)}/{CLUSTER}", json.dumps(
                    {"system_identifier": side["system_identifier"], "segment_size": side["segment_size"]}).encode())
            loc.put_bytes(f"{prefix}/{side['object']['name']}", stored_obj)
            loc.put_bytes(f"{prefix}/{name}.json", json.dumps(side, sort_keys=True).encode())
            result.stored.append(loc_name)
        except LocationError as e:
            failures.append(str(e))
    if failures:
        raise WalError(f"{name} is not archived everywhere: {'; '.join(failures)}. PostgreSQL keeps it and "
                       "retries; nothing is lost once the location is back")
    log(f"{name}: stored on {', '.join(result.stored) or '-'}"
        + (f"; identical copy already on {', '.join(result.already)}" if result.already else ""))
    return result


def ready_segments_after(path: Path, limit: int) -> list[Path]:
    """Segments after `path` that PostgreSQL has marked ready to archive (pg_wal/archive_status)."""
    if limit <= 0 or path.parent.name != "pg_wal":
        return []
    try:
        ready = sorted(p.name[:-6] for p in (path.parent / "archive_status").iterdir() if p.name.endswith(".ready"))
    except OSError:
        return []
    return [path.parent / n for n in ready if SEGMENT.match(n) and n > path.name][:limit]


def push_ahead(config: DrConfig, database: str, path: str | Path, locations: dict[str, Location], context: str,
               log: Log = lambda m: None) -> list[str]:
    """Archive the next ready segments now, in parallel, each marked once durable everywhere, so
    PostgreSQL's calls for them take the fast path. Best effort: a segment that fails here is
    pushed (and its error reported) when PostgreSQL asks for it."""
    from concurrent.futures import ThreadPoolExecutor

    from dr_pipelines.core.wal_spool import PUSHED, mark_pushed

    path = Path(path)
    markers = path.parent / PUSHED
    if markers.is_dir():  # PostgreSQL asks in order: a marker at or before this name is stale
        for m in markers.iterdir():
            if m.name <= path.name or not (path.parent / "archive_status" / f"{m.name}.ready").exists():
                m.unlink(missing_ok=True)
    todo = [p for p in ready_segments_after(path, config.wal.push_ahead) if not (markers / p.name).exists()]
    if not todo:
        return []

    def push(segment: Path) -> str:
        wal_push(config, database, segment, locations)
        mark_pushed(segment, context)
        return segment.name

    # each worker holds a segment three times (plain, compressed, encrypted): bound it by size
    workers = max(1, min(len(todo), 4, (256 << 20) // max(1, todo[0].stat().st_size)))
    done = []
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="push-ahead") as pool:
        for segment, future in [(s, pool.submit(push, s)) for s in todo]:
            try:
                done.append(future.result())
            except Exception as e:
                log(f"{segment.name}: not archived ahead ({e}); it will be when PostgreSQL asks for it")
    if done:
        log(f"archived ahead: {', '.join(done)}")
    return done


def fetch_bytes(config: DrConfig, database: str, name: str, locations: dict[str, Location],
                identities: list | None, log: Log) -> tuple[bytes, str] | None:
    """One pass over the locations: (plain bytes, location), or None if no location has it.
    Raises WalFetchAborted when some location errored or every copy found is corrupt."""
    prefix = f"{wal_prefix(database)}/{timeline_of(name)}"
    problems = []
    for loc_name, loc in locations.items():
        try:
            side = _read_json(loc, f"{prefix}/{name}.json")
            if side is None:
                continue
            blob = loc.get_bytes(f"{prefix}/{side['object']['name']}")
        except LocationError as e:  # includes an object missing under its sidecar
            problems.append(str(e))
            continue
        if _sha(blob) != side["object"]["sha256"]:
            problems.append(f"{loc_name}: stored {name} fails its checksum (corrupt object)")
            continue
        try:
            data = decode(blob, side, identities)
        except WalFetchAborted:
            raise
        except Exception as e:
            problems.append(f"{loc_name}: cannot decode {name}: {e}")
            continue
        if _sha(data) != side["sha256"]:
            problems.append(f"{loc_name}: {name} decodes to different bytes than were archived")
            continue
        for p in problems:
            log(f"warning: {p}; used the copy on {loc_name}")
        return data, loc_name
    if problems:
        raise WalFetchAborted("; ".join(problems))
    return None


def wal_fetch(config: DrConfig, database: str, name: str, dest: str | Path, locations: dict[str, Location],
              identities: list | None = None, retries: int = 3, backoff_s: float = 1.0,
              log: Log = lambda m: None, prefetch: int = 0) -> str:
    dest = Path(dest)
    last_error = None
    for attempt in range(retries + 1):
        try:
            found = fetch_bytes(config, database, name, locations, identities, log)
        except WalFetchAborted as e:
            last_error = e
            log(f"{name}: attempt {attempt + 1} failed: {e}")
            time.sleep(backoff_s * (2 ** attempt))
            continue
        if found is None:
            raise WalNotFound(f"{name} is not in the WAL archive of {database!r} on any location")
        data, loc_name = found
        write_atomically(dest, data)
        if prefetch and SEGMENT.match(name):
            try:  # best effort: the requested file is in place; a prefetch problem must not fail it
                prefetch_after(config, database, name, len(data), dest, locations, identities, prefetch, log)
            except Exception as e:
                log(f"warning: prefetch after {name} stopped: {e}")
        return loc_name
    raise WalFetchAborted(f"cannot fetch {name} after {retries + 1} attempts: {last_error}. Recovery is "
                          "aborted rather than ended early; fix the location and start the server again")


def prefetch_after(config: DrConfig, database: str, name: str, segment_size: int, dest: Path,
                   locations: dict[str, Location], identities: list | None, count: int, log: Log) -> int:
    """Fetch the next `count` segments of the timeline into the spool, in parallel. Best effort:
    a segment that is missing or fails here is simply fetched normally when PostgreSQL asks."""
    from concurrent.futures import ThreadPoolExecutor

    from dr_pipelines.core.wal_spool import spool_dir

    spool = spool_dir(dest)
    spool.mkdir(exist_ok=True)
    tli, number = parse_segment(name, segment_size)
    wanted = [n for n in (segment_name(tli, number + i, segment_size) for i in range(1, count + 1))
              if not (spool / n).exists()]

    def one(n: str) -> bool:
        try:
            found = fetch_bytes(config, database, n, locations, identities, log)
            if found is None:
                return False
            write_atomically(spool / n, found[0])
            return True
        except Exception:  # fetched normally when PostgreSQL asks
            return False

    with ThreadPoolExecutor(max_workers=4) as pool:
        return sum(pool.map(one, wanted))


# --------------------------------------------------------------------------- listing


def parse_segment(name: str, segment_size: int) -> tuple[int, int]:
    """(timeline, absolute segment number)."""
    per_log = 0x100000000 // segment_size
    return int(name[:8], 16), int(name[8:16], 16) * per_log + int(name[16:24], 16)


def segment_name(timeline: int, number: int, segment_size: int) -> str:
    per_log = 0x100000000 // segment_size
    return f"{timeline:08X}{number // per_log:08X}{number % per_log:08X}"


def lsn_to_segment(lsn: str, timeline: int, segment_size: int, end: bool = False) -> str:
    """The segment holding `lsn`; for an end position exactly on a boundary, the segment before it
    (as PostgreSQL's XLByteToPrevSeg: the record ends there, nothing of it is in the next one)."""
    hi, lo = (int(x, 16) for x in lsn.split("/"))
    value = (hi << 32) | lo
    if end and value % segment_size == 0:
        value -= 1
    return segment_name(timeline, value // segment_size, segment_size)


@dataclass(frozen=True)
class ArchivedFile:
    name: str  # the WAL file name PostgreSQL asks for
    kind: str  # segment, history, backup or partial
    pushed_at: datetime  # when its sidecar (the commit marker) was written
    object_name: str  # the stored object beside the sidecar (name + compression/encryption suffixes)


@dataclass
class WalArchive:
    segments: dict[int, list[str]]  # timeline -> segment names, sorted
    histories: list[str]
    backups: list[str]
    files: dict[str, ArchivedFile]
    segment_size: int | None
    problems: list[str]

    def gaps(self, timeline: int) -> list[tuple[str, str]]:
        """Missing runs (first missing, last missing) between the first and last segment."""
        names = self.segments.get(timeline, [])
        if not names or not self.segment_size:
            return []
        nums = [parse_segment(n, self.segment_size)[1] for n in names]
        out = []
        for a, b in zip(nums, nums[1:]):
            if b > a + 1:
                out.append((segment_name(timeline, a + 1, self.segment_size),
                            segment_name(timeline, b - 1, self.segment_size)))
        return out

    def newest(self) -> ArchivedFile | None:
        segments = [f for f in self.files.values() if f.kind == "segment"]
        return max(segments, key=lambda f: f.name[8:] + f.name[:8]) if segments else None


def _stored_wal_name(basename: str) -> str:
    """The WAL name inside a stored object's name: "X.zst.age" -> "X"."""
    for suffix in (".age", ".zst", ".gz"):
        basename = basename.removesuffix(suffix)
    return basename


def _segment_size(locations: dict[str, Location], database: str, files: dict[str, ArchivedFile]) -> int | None:
    """From cluster.json, else from one segment's sidecar (two reads at most per location)."""
    size = (archive_cluster(locations, database) or {}).get("segment_size")
    newest = max((f for f in files.values() if f.kind == "segment"), key=lambda f: f.name, default=None)
    for loc in locations.values():
        if size or newest is None:
            break
        try:
            side = _read_json(loc, f"{wal_prefix(database)}/{timeline_of(newest.name)}/{newest.name}.json")
        except (LocationError, ValueError):
            continue
        size = (side or {}).get("segment_size")
    return size


def list_archive(locations: dict[str, Location], database: str) -> WalArchive:
    """Merged across locations, from the listings alone: no object is read, because an archive
    holds thousands of files and the observer lists it on every tick (one GET per sidecar would
    make that slow and costly on S3). A file counts where both its object and its sidecar, written
    after the object, are listed; a sidecar without its object is reported as a problem."""
    files: dict[str, ArchivedFile] = {}
    problems = []
    for loc in locations.values():
        try:
            listed = list(loc.list(f"{wal_prefix(database)}/"))
        except LocationError as e:
            problems.append(str(e))
            continue
        sidecars, stored = {}, {}
        for obj in listed:
            base = obj.key.rsplit("/", 1)[-1]
            if base == CLUSTER or base.startswith("."):
                continue
            if base.endswith(".json"):
                sidecars[base[:-5]] = obj
            else:
                stored[_stored_wal_name(base)] = base
        for name, side in sidecars.items():
            if name in files:
                continue
            try:
                kind = _classify(name)
            except WalRefused:
                problems.append(f"{loc.url(side.key)}: not a WAL file name; ignored")
                continue
            if name not in stored:
                problems.append(f"{loc.url(side.key)}: sidecar without its object (deleted or lost); "
                                f"the file counts as missing on {loc.name}")
                continue
            pushed = side.modified or datetime.fromisoformat(json.loads(loc.get_bytes(side.key))["pushed_at"])
            files[name] = ArchivedFile(name, kind, pushed, stored[name])
    segments: dict[int, list[str]] = {}
    for f in files.values():
        if f.kind == "segment":
            segments.setdefault(int(f.name[:8], 16), []).append(f.name)
    for names in segments.values():
        names.sort()
    size = _segment_size(locations, database, files) if segments else None
    if segments and not size:
        problems.append(f"the segment size of {database!r}'s WAL archive is unknown (cluster.json and the "
                        "sidecars could not be read): gaps cannot be computed")
    return WalArchive(segments, sorted(n for n, f in files.items() if f.kind == "history"),
                      sorted(n for n, f in files.items() if f.kind == "backup"), files, size, problems)


# --------------------------------------------------------------------------- postgresql.conf


def dr_pipelines_command(config_file: str | None) -> list[str]:
    """This installation's command, absolute (PostgreSQL runs it from its data directory)."""
    import sys

    exe = str(Path(sys.executable).parent / "dr-pipelines")
    return [exe] + (["--config", str(Path(config_file).resolve())] if config_file else [])


def _shell(args: list[str]) -> str:
    import shlex

    return " ".join(a if a in ("%p", "%f") else shlex.quote(a) for a in args)


def pg_quote(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def archive_timeout_s(config: DrConfig, database: str) -> int:
    """Half the RPO (a segment switch plus a retried push still land within it), at least 60 s."""
    return max(60, int(config.database(database).objectives.rpo.total_seconds() // 2))


def restore_command(config_file: str | None, database: str) -> str:
    return _shell(dr_pipelines_command(config_file) + ["wal-fetch", "--db", database, "%f", "%p"])


def postgresql_conf_lines(config: DrConfig, database: str, config_file: str | None) -> list[str]:
    push = _shell(dr_pipelines_command(config_file) + ["wal-push", "--db", database, "%p"])
    return [
        f"# dr_pipelines: WAL archiving for database {database!r} (RPO "
        f"{config.database(database).objectives.rpo}); needs a restart for wal_level/archive_mode",
        "wal_level = replica",
        "archive_mode = on",
        f"archive_command = {pg_quote(push)}",
        f"archive_timeout = {archive_timeout_s(config, database)}s",
        f"# recovery (written by `dr-pipelines pitr`): restore_command = {pg_quote(restore_command(config_file, database))}",
    ]


# --------------------------------------------------------------------------- health


@dataclass
class WalStatus:
    database: str
    newest_segment: str | None
    newest_pushed_at: str | None
    segments: int
    gaps: list[str]  # "FIRST..LAST" runs missing after the oldest base backup's start
    archive_lag_s: float | None  # how long archived WAL has been behind the server (0: caught up)
    failed_count: int | None
    last_failed_wal: str | None
    server_error: str | None
    oldest_base_start: str | None
    push_times: list[datetime] = field(default_factory=list)  # of every archived segment: recovery points


def wal_status(config: DrConfig, database: str, locations: dict[str, Location], now: datetime,
               base_starts: list[str]) -> WalStatus:
    """The archive as the repository shows it, and the lag as the server shows it (pg_stat_archiver);
    if the server can't be reached, the lag is the age of the newest archived segment."""
    archive = list_archive(locations, database)
    newest = archive.newest()
    start = min(base_starts) if base_starts else None
    lag = failed = last_failed = server_error = last = None
    try:
        from dr_pipelines.core.postgres import connect

        with connect(config.database(database), database) as conn:
            row = conn.execute(
                "SELECT last_archived_wal, last_archived_time, failed_count, last_failed_wal, "
                "pg_walfile_name(pg_current_wal_lsn()), "
                "(SELECT setting::int FROM pg_settings WHERE name = 'wal_segment_size') FROM pg_stat_archiver").fetchone()
        last, last_time, failed, last_failed, current, size = row
        tli, number = parse_segment(current, size)
        previous = segment_name(tli, number - 1, size)  # the newest segment that is complete
        caught_up = last is not None and last >= previous
        lag = 0.0 if caught_up else (now - last_time).total_seconds() if last_time else None
    except Exception as e:  # unreachable server: the repository still answers
        server_error = str(e).splitlines()[0]
        if newest:
            lag = (now - newest.pushed_at).total_seconds()
    gaps = []
    for tli, names in archive.segments.items():
        for a, b in archive.gaps(tli):
            if last is not None and SEGMENT.match(last) and a[:8] == last[:8] and a > last:
                continue  # PostgreSQL has not archived it yet: wal-push archived later ones ahead of it
            if start is None or b >= start or tli > int(start[:8], 16):
                gaps.append(a if a == b else f"{a}..{b}")
    if start and archive.segment_size and start not in set(archive.segments.get(int(start[:8], 16), [])):
        gaps.insert(0, f"{start} (the oldest base backup's first segment)")
    if archive.segments and not archive.segment_size:  # fail closed: no verdict is not "no gap"
        gaps.insert(0, "unknown: the archive's segment size could not be read")
    push_times = sorted(f.pushed_at for f in archive.files.values() if f.kind == "segment")
    return WalStatus(database, newest.name if newest else None, newest.pushed_at.isoformat() if newest else None,
                     sum(len(v) for v in archive.segments.values()), gaps, lag, failed, last_failed,
                     server_error, start, push_times)
