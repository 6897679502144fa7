"""What the WAL observer says of streaming (`wal-stream`), per database: is a streamer receiving,
how far behind the server the archive is (bytes and seconds), how much WAL the replication slot
holds back on the primary, and which segments a location still lacks. Its alerts go through the
sensors' `IncidentBook` (one alert per incident, resolved when it clears).

Read from three places, each optional: the server (`pg_replication_slots`, `pg_stat_replication`,
`pg_current_wal_lsn()`), the repository (what is archived), and wal-stream's `status.json` when
this host can read it. A question none of them can answer gets no verdict (the incident stays as
it was), never a false "all clear". Never imports dagster.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

from dr_pipelines.core.config import ConfigError, DrConfig
from dr_pipelines.core.monitoring.alerts import Alert
from dr_pipelines.core.postgres.wal_names import lsn_int, lsn_text, parse_segment
from dr_pipelines.core.storage.base import Location, LocationError
from dr_pipelines.core.units import human_size
from dr_pipelines.core.wal.archive import STREAMED, WalArchive, _read_json, list_archive, wal_prefix

STREAM_DOWN = "stream_down"
SLOT_WAL = "slot_wal"
SLOT_UNUSED = "slot_unused"
STREAM_BACKLOG = "stream_backlog"


@dataclass
class StreamHealth:
    database: str
    enabled: bool
    slot: str
    max_slot_wal: int
    server_error: str | None = None
    slot_exists: bool | None = None
    slot_active: bool | None = None
    slot_wal_status: str | None = None
    retained_bytes: int | None = None  # pg_current_wal_lsn() - restart_lsn: WAL the primary keeps for the slot
    receiver: dict | None = None  # the streamer's pg_stat_replication row (application_name = the slot)
    current_lsn: str | None = None
    archived_lsn: str | None = None  # where the archived WAL ends (whole segments or the streamed partial)
    lag_bytes: int | None = None
    lag_s: float | None = None  # an upper bound: since the archive last moved, while it is behind
    streamer: dict | None = None  # wal-stream's status.json, when readable here
    streamer_fresh: bool | None = None
    backlog: dict[str, list[str]] = field(default_factory=dict)  # location -> files it still lacks
    alerts: dict[str, Alert | None] = field(default_factory=dict)  # incident key -> alert, or None: cleared

    @property
    def up(self) -> bool | None:
        """None: no verdict (streaming off, or neither the server nor the status file answered)."""
        key = f"{STREAM_DOWN}:{self.database}"
        return self.alerts[key] is None if key in self.alerts else None

    def metadata(self) -> dict:
        """For the asset observation (stable keys, -1 when unknown)."""
        return {
            "stream_up": -1 if self.up is None else int(self.up),
            "stream_lag_bytes": -1 if self.lag_bytes is None else self.lag_bytes,
            "stream_lag_s": -1.0 if self.lag_s is None else round(self.lag_s, 1),
            "slot_retained_bytes": -1 if self.retained_bytes is None else self.retained_bytes,
            "stream_backlog": sum(len(v) for v in self.backlog.values()),
        }


def _archived_end(
    archive: WalArchive, locations: dict[str, Location], database: str, timeline: int
) -> tuple[int | None, datetime | None]:
    """Where the archived WAL of `timeline` ends, and when the file holding that end was pushed."""
    end, at = None, None
    size = archive.segment_size
    names = archive.segments.get(timeline, [])
    if names and size:
        newest = names[-1]
        end, at = (parse_segment(newest, size)[1] + 1) * size, archive.files[newest].pushed_at
    partials = sorted(n for n, f in archive.files.items() if f.kind == STREAMED and int(n[:8], 16) == timeline)
    if partials and (end is None or size is None or parse_segment(partials[-1][:24], size)[1] * size >= end):
        prefix = f"{wal_prefix(database)}/{partials[-1][:8]}/{partials[-1]}.json"
        for loc in locations.values():
            try:
                side = _read_json(loc, prefix)
            except (LocationError, ValueError):
                continue
            if side and lsn_int(side["end_lsn"]) > (end or 0):
                end, at = lsn_int(side["end_lsn"]), archive.files[partials[-1]].pushed_at
                break
    return end, at


def stale_after(config: DrConfig, database: str) -> timedelta:
    """A status.json older than this was left by a wal-stream that stopped or hangs."""
    return max(timedelta(seconds=15), 10 * config.database(database).streaming.partial_interval)


def lag_limit_s(config: DrConfig, database: str) -> float:
    """While streaming, the archive moves at least every partial_interval: behind the server for
    longer than this (seconds), streaming is down whatever the slot says."""
    return max(60.0, 3 * config.database(database).streaming.partial_interval.total_seconds())


def stream_health(
    config: DrConfig,
    database: str,
    locations: dict[str, Location],
    now: datetime,
    archive: WalArchive | None = None,
    server_down: str | None = None,
) -> StreamHealth:
    """`server_down`: the server was just found unreachable (why): it is not asked again."""
    from dr_pipelines.core.wal.stream import read_stream_status

    streaming = config.database(database).streaming
    try:
        slot = streaming.slot_name(database)
    except ConfigError:  # too long a default name: refused at config load when streaming is enabled
        if streaming.enabled:
            raise
        return StreamHealth(database, False, "", streaming.max_slot_wal)  # no slot of that name can exist
    h = StreamHealth(database, streaming.enabled, slot, streaming.max_slot_wal)
    url = config.webserver_url.rstrip("/") + f"/assets/{database}/wal_archive"
    since = now.isoformat(timespec="seconds")

    def alert(kind: str, title: str, detail: str, severity: str = "error") -> Alert:
        return Alert(f"{kind}:{database}", title, detail, f"database {database}, slot {slot}", since, url, severity)

    try:
        from dr_pipelines.core.postgres.client import DatabaseUnreachable, connect

        if server_down:
            raise DatabaseUnreachable(server_down)
        with connect(config.database(database), database) as conn:
            row = conn.execute(
                "SELECT pg_current_wal_lsn()::text, pg_walfile_name(pg_current_wal_lsn()), "
                "s.slot_name IS NOT NULL, s.active, s.wal_status, "
                "pg_wal_lsn_diff(pg_current_wal_lsn(), s.restart_lsn)::bigint, "
                "r.state, r.sync_state, r.flush_lsn::text, r.reply_time "
                "FROM (SELECT 1) one "
                "LEFT JOIN pg_replication_slots s ON s.slot_name = %(slot)s "
                "LEFT JOIN LATERAL (SELECT * FROM pg_stat_replication WHERE application_name = %(slot)s "
                "ORDER BY backend_start DESC LIMIT 1) r ON true",
                {"slot": slot},
            ).fetchone()
        assert row is not None
        current, current_file, h.slot_exists, h.slot_active, h.slot_wal_status, h.retained_bytes = row[:6]
        h.current_lsn = current
        if row[6] is not None:
            h.receiver = {"state": row[6], "sync_state": row[7], "flush_lsn": row[8], "reply_time": str(row[9])}
    except Exception as e:  # unreachable (or a standby): the repository and the status file still answer
        h.server_error = str(e).splitlines()[0]
        current = current_file = None

    if streaming.enabled:
        h.streamer = read_stream_status(config, database)
        if h.streamer:
            try:
                updated = datetime.fromisoformat(h.streamer["updated_at"])
                h.streamer_fresh = not h.streamer.get("stopped_at") and now - updated <= stale_after(config, database)
            except (KeyError, ValueError):
                h.streamer_fresh = False
            if h.streamer_fresh:
                h.backlog = {n: files for n, files in (h.streamer.get("backlog") or {}).items() if files}
        if current is not None and current_file is not None:
            archive = archive or list_archive(locations, database)
            end, at = _archived_end(archive, locations, database, int(current_file[:8], 16))
            h.archived_lsn = lsn_text(end) if end is not None else None
            h.lag_bytes = max(0, lsn_int(current) - end) if end is not None else None
            if h.lag_bytes == 0:
                h.lag_s = 0.0
            elif at is not None:
                h.lag_s = max(0.0, (now - at).total_seconds())

    # -- the streamer is down
    if streaming.enabled:
        why = []
        if h.server_error is None:
            if not h.slot_exists:
                why.append(f"the slot {slot} does not exist (wal-stream makes it when it starts)")
            elif not h.slot_active:
                why.append(f"no pg_receivewal is connected to the slot {slot}")
            elif h.receiver is None:
                why.append(f"the slot {slot} is in use, but not by wal-stream's pg_receivewal (application_name)")
        if h.streamer is not None and h.streamer_fresh is False:
            why.append(
                f"wal-stream's status was last written at {h.streamer.get('updated_at')}"
                + (" (it stopped)" if h.streamer.get("stopped_at") else " (it is not running, or hangs)")
            )
        # measured from the repository alone: pg_receivewal may be connected (the slot active) while
        # every push fails, and this host may not read wal-stream's status
        behind = lag_limit_s(config, database)
        if h.lag_s is not None and h.lag_bytes and h.lag_s > behind:
            why.append(
                f"the archive has not moved for {h.lag_s:.0f}s (limit {behind:g}s) while the server is "
                f"{h.lag_bytes} bytes ahead of it: WAL is received but not archived (are its pushes failing?)"
            )
        if h.streamer and h.streamer_fresh and h.streamer.get("receiver", {}).get("last_exit") and why:
            why.append(f"pg_receivewal last stopped with: {h.streamer['receiver']['last_exit']}")
        if why:
            h.alerts[f"{STREAM_DOWN}:{database}"] = alert(
                STREAM_DOWN,
                f"WAL streaming of {database} is down",
                "; ".join(why)
                + f". Until it runs, the WAL written since the archive's last file ({h.archived_lsn or 'unknown'}) "
                f"exists only on the server. Start it: `dr-pipelines wal-stream {database}` (as a service: see "
                "the README), and read its log",
            )
        elif h.server_error is None or h.streamer_fresh:
            h.alerts[f"{STREAM_DOWN}:{database}"] = None

    # -- the slot holds back too much WAL (or lost some), or nobody uses it any more
    if h.server_error is None:
        drop = f"SELECT pg_drop_replication_slot('{slot}')"
        if h.slot_exists and h.retained_bytes is not None and h.retained_bytes > streaming.max_slot_wal:
            h.alerts[f"{SLOT_WAL}:{database}"] = alert(
                SLOT_WAL,
                f"replication slot {slot} of {database} holds back {human_size(h.retained_bytes)} of WAL "
                f"(limit {human_size(streaming.max_slot_wal)})",
                f"PostgreSQL keeps every WAL segment the slot has not received ({h.retained_bytes} bytes, "
                f"wal_status {h.slot_wal_status}); the primary's pg_wal grows until its disk is full. "
                + (
                    f"Start or fix `dr-pipelines wal-stream {database}`; if streaming is off for good, drop the slot: "
                    if streaming.enabled
                    else f"Streaming is off for {database}: drop the slot: "
                )
                + drop,
            )
        elif h.slot_exists and h.slot_wal_status == "lost":
            h.alerts[f"{SLOT_WAL}:{database}"] = alert(
                SLOT_WAL,
                f"replication slot {slot} of {database} lost WAL before it was received",
                "max_slot_wal_keep_size removed WAL the streamer never received: the archive has a gap there "
                f"unless archive_command covered it (check `dr-pipelines wal list {database}`). Drop the slot "
                f"({drop}) and start wal-stream again",
            )
        else:
            h.alerts[f"{SLOT_WAL}:{database}"] = None
        if not streaming.enabled:
            h.alerts[f"{SLOT_UNUSED}:{database}"] = (
                alert(
                    SLOT_UNUSED,
                    f"streaming is off for {database}, but its replication slot {slot} still exists",
                    f"The slot makes PostgreSQL keep WAL for a streamer that no longer runs "
                    f"({human_size(h.retained_bytes or 0)} so far): the primary's disk fills. If streaming "
                    f"is off for good, drop it: {drop}; else set databases.{database}.streaming.enabled: true "
                    "and run wal-stream",
                    "warning",
                )
                if h.slot_exists and not h.slot_active
                else None
            )

    # -- a location lacks streamed segments (wal-stream keeps them and retries)
    if streaming.enabled and h.streamer_fresh:
        refused = (h.streamer or {}).get("refused") or {}
        h.alerts[f"{STREAM_BACKLOG}:{database}"] = (
            alert(
                STREAM_BACKLOG,
                f"streamed WAL of {database} is missing on " + ", ".join(sorted(h.backlog) or ["a location (refused)"]),
                "; ".join(
                    f"{n} lacks {len(files)} file(s) ({files[0]} .. {files[-1]}): "
                    + str(((h.streamer or {}).get("down") or {}).get(n, {}).get("error") or "being retried")
                    for n, files in sorted(h.backlog.items())
                )
                + ("; refused: " + "; ".join(refused.values()) if refused else "")
                + ". wal-stream keeps them in its spool and fills the gap when the location answers",
                "error" if refused else "warning",
            )
            if h.backlog or refused
            else None
        )
    return h


STREAM_UP_CHECK = "wal_stream_up"
SLOT_CHECK = "slot_wal_within_limit"
STREAM_COMPLETE_CHECK = "wal_stream_complete"


def stream_outcomes(h: StreamHealth) -> list:
    """The same verdicts as `status` checks (exit code, JSON), for a database that streams."""
    from dr_pipelines.core.monitoring.outcome import ERROR, WARNING, Outcome

    md = h.metadata()
    out = []
    for kind, check, severity, fine in (
        (STREAM_DOWN, STREAM_UP_CHECK, ERROR, f"streaming; the archive is {h.lag_bytes} bytes behind the server"),
        (SLOT_WAL, SLOT_CHECK, ERROR, f"the slot {h.slot} holds {human_size(h.retained_bytes or 0)} of WAL"),
        (STREAM_BACKLOG, STREAM_COMPLETE_CHECK, WARNING, "every location has every streamed segment"),
    ):
        key = f"{kind}:{h.database}"
        if key not in h.alerts and kind == STREAM_BACKLOG:
            continue  # known only where wal-stream's status file can be read
        if key not in h.alerts:
            why = h.server_error or "the server did not answer"
            out.append(Outcome(h.database, check, False, WARNING, f"cannot tell: {why}", md))
            continue
        alert = h.alerts[key]
        out.append(
            Outcome(
                h.database,
                check,
                alert is None,
                alert.severity if alert else severity,
                f"{alert.title}: {alert.detail}" if alert else fine,
                md,
            )
        )
    return out
