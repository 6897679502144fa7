"""`wal-fetch` (restore_command): exit 1 only for "not found"; transient errors abort recovery; prefetch."""

from __future__ import annotations

import time
from pathlib import Path

from dr_pipelines.core.codec.decode import decode_bytes
from dr_pipelines.core.config import DrConfig
from dr_pipelines.core.durable import write_atomically
from dr_pipelines.core.log import Log
from dr_pipelines.core.postgres.wal_names import (
    SEGMENT,
    STREAM_SUFFIX,
    lsn_int,
    parse_segment,
    segment_name,
    timeline_of,
)
from dr_pipelines.core.storage.base import Location, LocationError
from dr_pipelines.core.wal.archive import (
    WalFetchAborted,
    WalNotFound,
    _read_json,
    sha256_hex,
    wal_prefix,
)


def fetch_bytes(
    config: DrConfig, database: str, name: str, locations: dict[str, Location], identities: list | None, log: Log
) -> tuple[bytes, str] | None:
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
        if sha256_hex(blob) != side["object"]["sha256"]:
            problems.append(f"{loc_name}: stored {name} fails its checksum (corrupt object)")
            continue
        if side["encryption"] == "age" and not identities:
            raise WalFetchAborted(
                "the WAL archive is age-encrypted and no identity is configured "
                "(encryption.identity_file or identity_file_env)"
            )
        try:
            data = decode_bytes(blob, side["compression"], side["encryption"], identities)
        except Exception as e:
            problems.append(f"{loc_name}: cannot decode {name}: {e}")
            continue
        if sha256_hex(data) != side["sha256"]:
            problems.append(f"{loc_name}: {name} decodes to different bytes than were archived")
            continue
        for p in problems:
            log(f"warning: {p}; used the copy on {loc_name}")
        return data, loc_name
    if problems:
        raise WalFetchAborted("; ".join(problems))
    return None


# --partial: after the tip check fails, the segment is looked for again this often (seconds apart)
# before it is "not found": a live wal-stream completes a segment between the two looks
RELOOK_S = (0.0, 0.3)


def wal_fetch(
    config: DrConfig,
    database: str,
    name: str,
    dest: str | Path,
    locations: dict[str, Location],
    identities: list | None = None,
    retries: int = 3,
    backoff_s: float = 1.0,
    log: Log = lambda m: None,
    prefetch: int = 0,
    partial: bool = False,
) -> str:
    """`partial`: a segment archived nowhere whole may be served from the newest streamed partial
    (wal-stream's `<segment>.stream.partial`) when it is the end of its timeline's WAL: what
    recovery to the newest point asks for (PostgreSQL never asks for a partial by name)."""
    dest = Path(dest)
    last_error = None
    for attempt in range(retries + 1):
        try:
            found = fetch_bytes(config, database, name, locations, identities, log)
            if found is None and partial and SEGMENT.match(name):
                found = fetch_streamed_tip(config, database, name, locations, identities, log)
                if found is not None:  # never prefetch after it: nothing whole comes after the tip
                    write_atomically(dest, found[0])
                    return found[1]
                # not the tip, or its partial vanished: wal-stream may have just archived the whole
                # segment (then dropped its partial, then begun the next one's): look again
                for wait in RELOOK_S:
                    time.sleep(wait)
                    found = fetch_bytes(config, database, name, locations, identities, log)
                    if found is not None:
                        break
        except WalFetchAborted as e:
            last_error = e
            log(f"{name}: attempt {attempt + 1} failed: {e}")
            time.sleep(backoff_s * (2**attempt))
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
    raise WalFetchAborted(
        f"cannot fetch {name} after {retries + 1} attempts: {last_error}. Recovery is "
        "aborted rather than ended early; fix the location and start the server again"
    )


def prefetch_after(
    config: DrConfig,
    database: str,
    name: str,
    segment_size: int,
    dest: Path,
    locations: dict[str, Location],
    identities: list | None,
    count: int,
    log: Log,
) -> int:
    """Fetch the next `count` segments of the timeline into the spool, in parallel. Best effort:
    a segment that is missing or fails here is simply fetched normally when PostgreSQL asks."""
    from concurrent.futures import ThreadPoolExecutor

    from dr_pipelines.core.wal.fast_path import spool_dir

    spool = spool_dir(dest)
    spool.mkdir(exist_ok=True)
    tli, number = parse_segment(name, segment_size)
    wanted = [
        n
        for n in (segment_name(tli, number + i, segment_size) for i in range(1, count + 1))
        if not (spool / n).exists()
    ]

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


def fetch_streamed_tip(
    config: DrConfig, database: str, name: str, locations: dict[str, Location], identities: list | None, log: Log
) -> tuple[bytes, str] | None:
    """The streamed partial of segment `name`, if it is the newest WAL archived on its timeline
    (no whole segment and no partial after it on any location): else None, and the missing
    segment stays "not found" (a gap is never papered over with a partial). The longest copy wins.
    Costs one GET per location when there is no partial (archives that are not streamed); with
    one, a listing of the segments after it (this xlog id and the next: 2 x 256 segments of 16 MB
    at most; something later still is a gap, which pitr refuses before it starts)."""
    prefix = f"{wal_prefix(database)}/{timeline_of(name)}/"
    holders: list[tuple[int, str]] = []
    for loc_name, loc in locations.items():
        try:
            side = _read_json(loc, f"{prefix}{name}{STREAM_SUFFIX}.json")
            end = lsn_int(side["end_lsn"]) if side else None
        except LocationError as e:  # cannot rule it out there: not "not found"
            raise WalFetchAborted(f"cannot tell whether {name} was streamed: {e}") from None
        except (ValueError, KeyError, TypeError, AttributeError) as e:  # it may be the longest copy
            raise WalFetchAborted(f"{loc_name}: the sidecar of {name}{STREAM_SUFFIX} is unreadable: {e}") from None
        if end is not None:
            holders.append((end, loc_name))
    if not holders:
        return None
    after = [prefix + name[:16], f"{prefix}{name[:8]}{int(name[8:16], 16) + 1:08X}"]
    for loc in locations.values():
        for p in after:
            try:
                listed = [o.key.rsplit("/", 1)[-1] for o in loc.list(p)]
            except LocationError as e:
                raise WalFetchAborted(f"cannot tell whether {name} is the newest WAL: {e}") from None
            for base in listed:
                wal = base.removesuffix(".json")
                if base.endswith(".json") and (SEGMENT.match(wal) or wal.endswith(STREAM_SUFFIX)) and wal[:24] > name:
                    return None  # WAL after it is archived: this segment is missing, not the tip
    # Only a copy that ends where the longest seen ends: a shorter one would end recovery early,
    # silently. One that cannot be read now (replaced under us, a location failing) is retried.
    newest = max(end for end, _ in holders)
    problems, vanished = [], 0
    for loc_name in sorted(n for end, n in holders if end == newest):
        try:
            found = fetch_bytes(
                config, database, name + STREAM_SUFFIX, {loc_name: locations[loc_name]}, identities, log
            )
        except WalFetchAborted as e:  # e.g. its object replaced after we read the sidecar
            problems.append(str(e))
            continue
        if found is None:  # dropped meanwhile (its whole segment was archived): the caller looks again
            vanished += 1
            continue
        log(
            f"{name}: archived nowhere whole; serving the partial segment wal-stream pushed "
            f"(WAL up to {newest >> 32:X}/{newest & 0xFFFFFFFF:X}, from {loc_name}): recovery ends in it"
        )
        return found
    if problems:
        raise WalFetchAborted(
            f"the newest copy of {name}{STREAM_SUFFIX} (WAL up to {newest >> 32:X}/{newest & 0xFFFFFFFF:X}) "
            f"cannot be read now: {'; '.join(problems)}; a shorter copy would end recovery early"
        )
    return None
