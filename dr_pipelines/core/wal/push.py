"""`wal-push` (archive_command): durable on every location before exit 0; archives ahead in parallel."""

from __future__ import annotations

import json
import os
import struct
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from dr_pipelines.core.codec.encode import encode_bytes
from dr_pipelines.core.config import DrConfig
from dr_pipelines.core.log import Log
from dr_pipelines.core.postgres.wal_names import SEGMENT, STREAM_SUFFIX, lsn_int, lsn_text, timeline_of, written_end
from dr_pipelines.core.storage.base import Location, LocationError
from dr_pipelines.core.wal.archive import (
    CLUSTER,
    STREAMED,
    WalError,
    WalRefused,
    _classify,
    _read_json,
    archive_cluster,
    object_name,
    segment_header,
    sha256_hex,
    wal_prefix,
)

_idle_buffers: list[bytearray] = []
_buffers_lock = threading.Lock()
IDLE_BUFFERS = 2  # kept for the next pushes; the rest of a push-ahead burst's go back to the kernel
POOLED_MAX = 64 << 20


@contextmanager
def _file_bytes(path: Path) -> Iterator[memoryview]:
    """The whole file, in a buffer reused from push to push: a resident agent or wal-stream pushes a
    16 MB segment every few seconds, and a fresh buffer each time (returned to the kernel after, see
    core/memory.py) costs ~7 ms of page faults."""
    try:
        with open(path, "rb", buffering=0) as f:
            size = os.fstat(f.fileno()).st_size
            with _buffers_lock:
                buf = next((b for b in _idle_buffers if len(b) >= size), None)
                if buf is not None:
                    _idle_buffers.remove(buf)
            if buf is None:
                buf = bytearray(max(size, 16 << 20) if size <= POOLED_MAX else size)
            view = memoryview(buf)
            n = 0
            while n < size and (got := f.readinto(view[n:size])):
                n += got
    except OSError as e:
        raise WalError(f"cannot read {path}: {e.strerror}") from None
    try:
        with view[:n] as data:
            yield data
    finally:
        view.release()
        with _buffers_lock:
            if len(buf) <= POOLED_MAX and len(_idle_buffers) < IDLE_BUFFERS:
                _idle_buffers.append(buf)


@dataclass
class PushResult:
    name: str
    stored: list[str] = field(default_factory=list)  # newly written
    already: list[str] = field(default_factory=list)  # identical copy was there


class WalPartlyStored(WalError):
    """Durable on some locations, not on others (`failures`: location -> why); a push of the same
    file again fills in the others (what is there is checked, not rewritten)."""

    def __init__(self, message: str, result: PushResult, failures: dict[str, str]):
        super().__init__(message)
        self.result = result
        self.failures = failures


def pushing_cluster(path: Path) -> str | None:
    """The system identifier of the cluster archiving `path`: the first 8 bytes of its
    global/pg_control. PostgreSQL runs archive_command in the data directory and passes
    pg_wal/<file>; a path elsewhere falls back to the working directory."""
    data_dir = path.parent.parent if path.parent.name == "pg_wal" else Path.cwd()
    try:
        with open(data_dir / "global" / "pg_control", "rb") as f:
            head = f.read(8)
    except OSError:
        return None  # not run by PostgreSQL from a data directory: nothing to compare
    return str(struct.unpack("<Q", head)[0]) if len(head) == 8 else None


# An object without its sidecar this old (seconds) was left by a push that died: a live push holds
# one only between two calls, each bounded by the location's timeouts (connect + read + retries,
# about a minute at most by default), so three minutes also absorb clock skew with the server.
STALE_PUSH = 180.0
# How long a push that finds the object but not its sidecar waits for that sidecar (the other push
# writes it right after the object) before calling it a push in progress or a dead one's leftover.
SIDECAR_WAIT_S = 3.0


def _listed(loc: Location, key: str):
    """The listing's entry for `key` (size, modified), or None."""
    return next((o for o in loc.list(key) if o.key == key), None)


def _claim_archive(loc: Location, database: str, name: str, side: dict) -> None:
    """Write the archive's cluster record on `loc` if none is there; refuse `name` if another
    cluster's record got there first."""
    record = {"system_identifier": side["system_identifier"], "segment_size": side["segment_size"]}
    if not loc.create(f"{wal_prefix(database)}/{CLUSTER}", json.dumps(record).encode()):
        theirs = _read_json(loc, f"{wal_prefix(database)}/{CLUSTER}") or {}
        if theirs.get("system_identifier") != side["system_identifier"]:
            raise WalRefused(
                f"{name} comes from cluster {side['system_identifier']}, but cluster "
                f"{theirs.get('system_identifier')} claimed the WAL archive of {database!r} on "
                f"{loc.name} first; refusing to mix them"
            )


def _store(loc: Location, database: str, prefix: str, name: str, side: dict, stored: bytes, known: dict | None) -> bool:
    """Object, then sidecar, each created only if absent: of two pushers racing with the same name,
    exactly one wins, and the other is told (the same bytes: already archived; others: refused).
    Returns False when an identical copy was there."""
    if side["kind"] == "segment" and known is None:  # the first segment names the cluster
        _claim_archive(loc, database, name, side)
    object_key, side_key = f"{prefix}/{side['object']['name']}", f"{prefix}/{name}.json"
    if not loc.create(object_key, stored):
        # an object without its sidecar: a push in progress (archive_command and wal-stream push the
        # same segment within milliseconds: wait for its sidecar, then compare), or one that died
        delay, until = 0.05, time.monotonic() + SIDECAR_WAIT_S
        while True:
            existing = _read_json(loc, side_key)
            if existing is not None:
                return _same(existing, side, name, loc.name)
            if time.monotonic() >= until:
                break
            time.sleep(delay)
            delay = min(0.5, delay * 2)
        listed = _listed(loc, object_key)
        age = (datetime.now(timezone.utc) - listed.modified).total_seconds() if listed and listed.modified else 0.0
        if age < STALE_PUSH:
            raise WalError(f"{name}: another push of it is in progress on {loc.name}; PostgreSQL retries")
        # left by a push that died: replace it, unless another pusher replaced it meanwhile (deleting
        # theirs would leave their sidecar naming our bytes)
        if _listed(loc, object_key) != listed or _read_json(loc, side_key) is not None:
            raise WalError(f"{name}: another push of it is in progress on {loc.name}; PostgreSQL retries")
        loc.delete(object_key)
        if not loc.create(object_key, stored):
            raise WalError(f"{name}: another push of it is in progress on {loc.name}; PostgreSQL retries")
    if not loc.create(side_key, json.dumps(side, sort_keys=True).encode()):  # the commit marker
        return _same(_read_json(loc, side_key) or {}, side, name, loc.name)
    return True


def _same(existing: dict, side: dict, name: str, where: str) -> bool:
    if existing.get("sha256") != side["sha256"]:
        raise WalRefused(
            f"{name} is already archived on {where} with different content "
            f"(sha256 {str(existing.get('sha256'))[:12]}... vs {side['sha256'][:12]}...); refusing to "
            "overwrite archived WAL. Two clusters may be archiving to the same place"
        )
    return False


def wal_push(
    config: DrConfig, database: str, path: str | Path, locations: dict[str, Location], log: Log = lambda m: None
) -> PushResult:
    path = Path(path)
    kind = _classify(path.name)
    with _file_bytes(path) as data:
        return _push_bytes(config, database, path, kind, data, locations, log)


def _push_bytes(
    config: DrConfig, database: str, path: Path, kind: str, data: memoryview, locations: dict[str, Location], log: Log
) -> PushResult:
    name = path.name
    from concurrent.futures import ThreadPoolExecutor

    # The CPU work (hash, compress, encrypt) runs beside the lookups, and every location is read and
    # written at once: a lone segment's push waits for the slowest location, not for their sum. The
    # encoding is started before the lookups say it is needed: only a re-push (after a crash) wastes it.
    with ThreadPoolExecutor(max_workers=2 + len(locations), thread_name_prefix="wal-push") as pool:
        plain_sha = pool.submit(sha256_hex, data)
        encoded = pool.submit(encode_bytes, data, config.compression, config.encryption)
        prefix = f"{wal_prefix(database)}/{timeline_of(name)}"

        def look(loc_name: str) -> dict | None | LocationError | ValueError:
            try:
                return _read_json(locations[loc_name], f"{prefix}/{name}.json")
            except (LocationError, ValueError) as e:
                return e

        # The archive's cluster record and this file's sidecar on every location are read at once:
        # on object storage each is a round trip.
        found = pool.map(look, list(locations))
        known = archive_cluster(locations, database)
        side = {
            "name": name,
            "kind": kind,
            "size": len(data),
            "sha256": "",
            "compression": config.compression.method,
            "encryption": config.encryption.method,
            "pushed_at": datetime.now(timezone.utc).isoformat(),
        }
        if kind != "segment":  # history files, backup labels, partial segments carry no system identifier
            sysid = pushing_cluster(path)
            if sysid is not None:
                side["system_identifier"] = sysid
            if known and sysid is not None and known["system_identifier"] != sysid:
                raise WalRefused(
                    f"{name} is pushed by cluster {sysid} (its global/pg_control), but the WAL archive of {database!r} "
                    f"belongs to cluster {known['system_identifier']}; refusing to mix them (a foreign timeline history "
                    "would redirect every later recovery)"
                )
        if kind == "segment":
            header = segment_header(data)
            side.update(system_identifier=header["system_identifier"], segment_size=header["segment_size"])
            if known and known["system_identifier"] != header["system_identifier"]:
                raise WalRefused(
                    f"{name} comes from cluster {header['system_identifier']}, but the WAL archive of {database!r} "
                    f"belongs to cluster {known['system_identifier']}; refusing to mix them. If this cluster "
                    "replaced the old one on purpose, archive it under another database name"
                )
        result, failures = PushResult(name), {}
        # Look everywhere before writing anywhere: a conflict on one location must not leave the new
        # bytes on another (two different copies of one segment).
        side["sha256"] = plain_sha.result()
        missing: list[str] = []
        for loc_name, existing in zip(locations, found, strict=True):
            if isinstance(existing, LocationError):
                failures[loc_name] = str(existing)
            elif isinstance(existing, ValueError):
                failures[loc_name] = f"{loc_name}: {existing}"
            elif existing is None:
                missing.append(loc_name)
            elif existing["sha256"] != side["sha256"]:
                raise WalRefused(
                    f"{name} is already archived on {loc_name} with different content "
                    f"(sha256 {existing['sha256'][:12]}... vs {side['sha256'][:12]}...); refusing to "
                    "overwrite archived WAL. Two clusters may be archiving to the same place"
                )
            else:
                result.already.append(loc_name)
        if missing:  # stored only where some location lacks the file (not on a re-push)
            stored_obj, stored_sha = encoded.result()
            side["object"] = {"name": object_name(name, config), "size": len(stored_obj), "sha256": stored_sha}

            def store(loc_name: str) -> bool | LocationError:
                try:
                    return _store(locations[loc_name], database, prefix, name, side, stored_obj, known)
                except LocationError as e:
                    return e

            # Every location at once, local ones too: a local copy's write and fsync would otherwise
            # wait in front of the remote uploads. A push killed midway leaves an object without its
            # sidecar only on a location it was writing then (later pushes of the segment there wait
            # STALE_PUSH); a local one is written within milliseconds of the start, either way.
            for loc_name, stored in zip(missing, pool.map(store, missing), strict=True):
                if isinstance(stored, LocationError):
                    failures[loc_name] = str(stored)
                elif stored:
                    result.stored.append(loc_name)
                else:
                    result.already.append(loc_name)
    if failures:
        raise WalPartlyStored(
            f"{name} is not archived everywhere: {'; '.join(failures.values())}. PostgreSQL keeps it and "
            "retries; nothing is lost once the location is back",
            result,
            failures,
        )
    log(
        f"{name}: stored on {', '.join(result.stored) or '-'}"
        + (f"; identical copy already on {', '.join(result.already)}" if result.already else "")
    )
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


def push_ahead(
    config: DrConfig,
    database: str,
    path: str | Path,
    locations: dict[str, Location],
    context: str,
    log: Log = lambda m: None,
) -> list[str]:
    """Archive the next ready segments now, in parallel, each marked once durable everywhere, so
    PostgreSQL's calls for them take the fast path. Best effort: a segment that fails here is
    pushed (and its error reported) when PostgreSQL asks for it."""
    from concurrent.futures import ThreadPoolExecutor

    from dr_pipelines.core.wal.fast_path import PUSHED, mark_pushed

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


# --------------------------------------------------------------------------- wal-stream's partial segment


@dataclass
class StreamedPartial:
    """A partial segment read, checked and encoded once, to be stored on each location."""

    segment: str
    side: dict  # its sidecar (end_lsn: where the WAL written so far ends)
    stored: bytes  # compressed and encrypted
    known: dict | None  # the archive's cluster record, if one was found

    @property
    def name(self) -> str:
        return self.segment + STREAM_SUFFIX

    @property
    def end_lsn(self) -> str:
        return self.side["end_lsn"]


def prepare_streamed_partial(
    config: DrConfig, database: str, path: str | Path, known: dict | None, data: bytes | None = None
) -> StreamedPartial:
    """Read pg_receivewal's growing `<segment>.partial` (or take `data`, its bytes already read),
    check its cluster against the archive's record (`known`, from archive_cluster; refused if
    another), encode it once. Raises WalError if it cannot be read."""
    path = Path(path)
    segment = path.name.removesuffix(".partial")
    if data is None:
        try:
            data = path.read_bytes()
        except OSError as e:
            raise WalError(f"cannot read {path}: {e.strerror}") from None
    header = segment_header(data)
    if known and known["system_identifier"] != header["system_identifier"]:
        raise WalRefused(
            f"{path.name} comes from cluster {header['system_identifier']}, but the WAL archive of {database!r} "
            f"belongs to cluster {known['system_identifier']}; refusing to mix them"
        )
    name = segment + STREAM_SUFFIX
    stored, stored_sha = encode_bytes(data, config.compression, config.encryption)
    end, plain_sha = written_end(data, segment, header["segment_size"]), sha256_hex(data)
    # named after its content: a replacement is a new object, the sidecar switches to it
    object_base = f"{name}.{end:016X}-{plain_sha[:16]}"
    side = {
        "name": name,
        "kind": STREAMED,
        "segment": segment,
        "end_lsn": lsn_text(end),
        "size": len(data),
        "sha256": plain_sha,
        "compression": config.compression.method,
        "encryption": config.encryption.method,
        "pushed_at": datetime.now(timezone.utc).isoformat(),
        "system_identifier": header["system_identifier"],
        "segment_size": header["segment_size"],
        "object": {"name": object_name(object_base, config), "size": len(stored), "sha256": stored_sha},
    }
    return StreamedPartial(segment, side, stored, known)


STORED, SAME, NEWER_THERE = "stored", "same", "newer there"


def store_streamed_partial(loc: Location, database: str, partial: StreamedPartial) -> str:
    """Replace `<segment>.stream.partial` on one location. Its object is named after its content, so
    a replacement writes a new object, then switches the sidecar (the commit marker) to it, then
    deletes the object the old sidecar named: a reader always finds the bytes its sidecar names,
    or (holding a sidecar replaced meanwhile) no object at all, which it retries, never a mix.
    A copy there that ends later (another wal-stream, or one restarted with an older spool) is
    never replaced by a shorter one. Returns STORED, SAME (this very copy was there) or
    NEWER_THERE (a longer copy was there; nothing written). Raises LocationError."""
    side = partial.side
    if partial.known is None:  # the archive's first file names its cluster, as a segment would
        _claim_archive(loc, database, partial.name, side)
    prefix = f"{wal_prefix(database)}/{timeline_of(partial.segment)}"
    side_key = f"{prefix}/{partial.name}.json"
    try:
        existing = _read_json(loc, side_key)
        there = lsn_int(existing["end_lsn"]) if existing else None
    except (ValueError, KeyError, TypeError, AttributeError):  # unreadable: replaced by a good one
        existing, there = None, None
    if existing is not None and there is not None:
        if there > lsn_int(side["end_lsn"]):
            return NEWER_THERE
        if (
            existing.get("sha256") == side["sha256"]
            and existing.get("object", {}).get("name") == side["object"]["name"]
        ):
            return SAME
    loc.put_bytes(f"{prefix}/{side['object']['name']}", partial.stored)
    loc.put_bytes(side_key, json.dumps(side, sort_keys=True).encode())
    old = (existing or {}).get("object", {}).get("name") if isinstance(existing, dict) else None
    if old and old != side["object"]["name"]:
        try:  # best effort: a leftover goes with drop_streamed_partial
            loc.delete(f"{prefix}/{old}")
        except LocationError:
            pass
    return STORED


def drop_streamed_partial(database: str, segment: str, locations: dict[str, Location], config: DrConfig) -> list[str]:
    """Remove `<segment>.stream.partial` once the whole segment is archived there (sidecar first:
    the file is gone the moment its marker is; then every object of it, whatever version). Returns
    the problems (best effort: a leftover is never served while the whole segment exists, and
    retention removes it with its segment)."""
    name = segment + STREAM_SUFFIX
    prefix = f"{wal_prefix(database)}/{timeline_of(segment)}"
    problems = []
    for loc_name, loc in locations.items():
        try:
            loc.delete(f"{prefix}/{name}.json")
            for o in list(loc.list(f"{prefix}/{name}")):
                base = o.key.rsplit("/", 1)[-1]
                if base == name or base.startswith(name + "."):  # every version, and an older layout's
                    loc.delete(o.key)
        except LocationError as e:
            problems.append(f"{loc_name}: {e}")
    return problems
