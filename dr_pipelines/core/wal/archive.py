"""The WAL archive as stored: names, sidecars, the cluster record, the listing and its status."""

from __future__ import annotations

import hashlib
import json
import re
import struct
from dataclasses import dataclass, field
from datetime import datetime
from itertools import pairwise

from dr_pipelines.core.codec.methods import object_suffix
from dr_pipelines.core.config import DrConfig
from dr_pipelines.core.errors import DrError
from dr_pipelines.core.postgres.wal_names import (
    BACKUP_LABEL,
    HISTORY,
    PARTIAL,
    SEGMENT,
    STREAM_PARTIAL,
    XLP_LONG_HEADER,
    parse_segment,
    segment_name,
    timeline_of,
)
from dr_pipelines.core.storage.base import Location, LocationError, ObjectNotFound

CLUSTER = "cluster.json"


class WalError(DrError):
    """wal-push failed: PostgreSQL keeps the file and retries; nothing archived was changed."""


class WalRefused(WalError):
    """The file must not be archived here (another cluster, or different content under a known name)."""


class WalNotFound(WalError, LookupError):
    """The file exists on no location: the only case restore_command may exit 1."""


class WalFetchAborted(WalError):
    """Transient errors or only corrupt copies: recovery must stop rather than end early."""


STREAMED = "streamed"  # the kind of a wal-stream partial segment (<segment>.stream.partial)


def wal_prefix(database: str) -> str:
    return f"{database}/wal"


def _classify(name: str) -> str:
    for kind, rx in (
        ("segment", SEGMENT),
        ("history", HISTORY),
        ("backup", BACKUP_LABEL),
        ("partial", PARTIAL),
        (STREAMED, STREAM_PARTIAL),
    ):
        if rx.match(name):
            return kind
    raise WalRefused(
        f"{name!r} is not a WAL segment, .history, .backup or .partial file name; archive_command must pass %p"
    )


def segment_header(data: bytes | memoryview) -> dict:
    """The long page header at the start of every segment: timeline, system id, segment size."""
    if len(data) < 40:
        raise WalRefused(f"segment is {len(data)} bytes: too short to be WAL")
    magic, info, tli, pageaddr = struct.unpack_from("<HHIQ", data, 0)
    if not info & XLP_LONG_HEADER:
        raise WalRefused("segment does not start with a long page header: not a WAL segment")
    sysid, seg_size, blcksz = struct.unpack_from("<QII", data, 24)
    return {"timeline": tli, "system_identifier": str(sysid), "segment_size": seg_size, "magic": magic}


def object_name(name: str, config: DrConfig) -> str:
    return name + object_suffix(config.compression.method, config.encryption.method)


def sha256_hex(data: bytes | memoryview) -> str:
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


@dataclass(frozen=True)
class ArchivedFile:
    name: str  # the WAL file name PostgreSQL asks for
    kind: str  # segment, history, backup, partial (PostgreSQL's) or streamed (wal-stream's growing segment)
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
        for a, b in pairwise(nums):
            if b > a + 1:
                out.append(
                    (segment_name(timeline, a + 1, self.segment_size), segment_name(timeline, b - 1, self.segment_size))
                )
        return out

    def newest(self) -> ArchivedFile | None:
        segments = [f for f in self.files.values() if f.kind == "segment"]
        return max(segments, key=lambda f: f.name[8:] + f.name[:8]) if segments else None


# wal-stream names each version of a partial segment's object after its content
# ("<segment>.stream.partial.<end LSN>-<sha256 prefix>" + suffixes): a replacement writes a new
# object and switches the sidecar to it, so a sidecar never names bytes other than its own.
STREAM_OBJECT_TAG = re.compile(r"^([0-9A-F]{24}\.stream\.partial)\.[0-9A-F]{16}-[0-9a-f]{8,64}$")


def _stored_wal_name(basename: str) -> str:
    """The WAL name inside a stored object's name: "X.zst.age" -> "X"."""
    for suffix in (".age", ".zst", ".gz"):
        basename = basename.removesuffix(suffix)
    tagged = STREAM_OBJECT_TAG.match(basename)
    return tagged.group(1) if tagged else basename


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
                problems.append(
                    f"{loc.url(side.key)}: sidecar without its object (deleted or lost); "
                    f"the file counts as missing on {loc.name}"
                )
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
        problems.append(
            f"the segment size of {database!r}'s WAL archive is unknown (cluster.json and the "
            "sidecars could not be read): gaps cannot be computed"
        )
    return WalArchive(
        segments,
        sorted(n for n, f in files.items() if f.kind == "history"),
        sorted(n for n, f in files.items() if f.kind == "backup"),
        files,
        size,
        problems,
    )


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


def wal_status(
    config: DrConfig, database: str, locations: dict[str, Location], now: datetime, base_starts: list[str]
) -> WalStatus:
    """The archive as the repository shows it, and the lag as the server shows it (pg_stat_archiver);
    if the server can't be reached, the lag is the age of the newest archived segment."""
    archive = list_archive(locations, database)
    newest = archive.newest()
    start = min(base_starts) if base_starts else None
    lag = failed = last_failed = server_error = last = None
    try:
        from dr_pipelines.core.postgres.client import connect

        with connect(config.database(database), database) as conn:
            row = conn.execute(
                "SELECT last_archived_wal, last_archived_time, failed_count, last_failed_wal, "
                "pg_walfile_name(pg_current_wal_lsn()), "
                "(SELECT setting::int FROM pg_settings WHERE name = 'wal_segment_size') FROM pg_stat_archiver"
            ).fetchone()
        assert row is not None  # pg_stat_archiver always has its one row
        last, last_time, failed, last_failed, current, size = row
        tli, number = parse_segment(current, size)
        previous = segment_name(tli, number - 1, size)  # the newest segment that is complete
        # caught up when PostgreSQL's archiver is, or when the repository already holds that segment
        # (wal-stream, or an archive_command that pushed ahead, archived it first)
        held = newest is not None and newest.name[:8] == previous[:8] and newest.name >= previous
        caught_up = (last is not None and last >= previous) or held
        lag = 0.0 if caught_up else (now - last_time).total_seconds() if last_time else None
    except Exception as e:  # unreachable server: the repository still answers
        server_error = str(e).splitlines()[0]
        if newest:
            lag = (now - newest.pushed_at).total_seconds()
    gaps = []
    for tli in archive.segments:
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
    return WalStatus(
        database,
        newest.name if newest else None,
        newest.pushed_at.isoformat() if newest else None,
        sum(len(v) for v in archive.segments.values()),
        gaps,
        lag,
        failed,
        last_failed,
        server_error,
        start,
        push_times,
    )


def verify_wal(locations: dict[str, Location], database: str, since: str | None) -> tuple[int, list[str]]:
    """Read back every archived file from `since` (the oldest retained base backup's first segment)
    on every location, against its sidecar's size and SHA-256: a corrupt segment found now, not
    at the replay that needs it. Returns (files checked, problems)."""
    checked, problems = 0, []
    for loc in locations.values():
        try:
            listed = [o for o in loc.list(f"{wal_prefix(database)}/") if o.key.endswith(".json")]
        except LocationError as e:
            problems.append(str(e))
            continue
        for side_obj in listed:
            name = side_obj.key.rsplit("/", 1)[-1][: -len(".json")]
            if name == CLUSTER[: -len(".json")] or (since and SEGMENT.match(name) and name[8:] < since[8:]):
                continue
            # wal-stream replaces its partial segment while it grows: a pair read across a replacement
            # is read again, not reported as corrupt
            streamed, gone = bool(STREAM_PARTIAL.match(name)), False
            for _ in range(3 if streamed else 1):
                try:
                    side = json.loads(loc.get_bytes(side_obj.key))
                    stored = loc.get_bytes(f"{side_obj.key.rsplit('/', 1)[0]}/{side['object']['name']}")
                except ObjectNotFound as e:
                    gone = streamed  # removed once its whole segment was archived: nothing to check
                    problem = f"{loc.name}: {name}: cannot read it back ({e})"
                    if gone:
                        break
                    continue
                except (LocationError, ValueError, KeyError) as e:
                    problem = f"{loc.name}: {name}: cannot read it back ({e})"
                    continue
                problem = None
                if len(stored) == side["object"]["size"] and sha256_hex(stored) == side["object"]["sha256"]:
                    break
            if gone:
                continue
            if problem:
                problems.append(problem)
                continue
            checked += 1
            if len(stored) != side["object"]["size"] or sha256_hex(stored) != side["object"]["sha256"]:
                problems.append(
                    f"{loc.name}: {name} fails its checksum (corrupt object); a recovery through it "
                    "uses another location's copy, or stops there if none is good"
                )
    return checked, problems
