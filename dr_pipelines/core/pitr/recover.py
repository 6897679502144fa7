"""Point-in-time recovery: a base backup plus archived WAL, replayed into a new data directory.

Never over a running cluster: the target is a new directory and port (an existing non-empty
directory needs explicit confirmation, and one with a live postmaster is always refused). The
restored cluster gets our `restore_command`, the recovery target, `recovery_target_action =
promote`, `recovery_target_timeline = latest` and `recovery.signal`; its inherited port, socket
and archive settings are overridden (it must not archive into the source's archive unless asked).
We follow replay with a timeout and report the point actually reached, the data-loss window and
the RTO. A missing WAL segment is reported with the last reachable point, never hidden.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from dr_pipelines.core.child_env import server_env, tool_env
from dr_pipelines.core.codec.decode import DecodeFailed, HashingReader, decode_into
from dr_pipelines.core.codec.keys import load_identities
from dr_pipelines.core.config import ConfigError, DrConfig
from dr_pipelines.core.errors import DrError
from dr_pipelines.core.log import Log
from dr_pipelines.core.owner import owner_dead, owner_tag
from dr_pipelines.core.postgres.client import DEFAULT_PG_BIN
from dr_pipelines.core.postgres.cluster import (
    LocalCluster,
    _postgres_ids,
    chown_to_postgres,
    run_as_postgres,
)
from dr_pipelines.core.postgres.wal_names import lsn_int
from dr_pipelines.core.repository.catalog import (
    BackupNotFound,
    CatalogEntry,
    load_catalog,
)
from dr_pipelines.core.storage.base import Location
from dr_pipelines.core.storage.probe import usable_locations
from dr_pipelines.core.wal.archive import list_archive
from dr_pipelines.core.wal.pg_config import pg_quote, restore_command


class PitrError(DrError):
    pass


def parse_target_time(text: str) -> datetime:
    """An ISO 8601 time with a time zone (Z accepted), as the shell and the Launchpad take it."""
    try:
        t = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ConfigError(f"target time {text!r} is not an ISO 8601 time (e.g. 2026-11-23T10:15:00+00:00)") from None
    if t.tzinfo is None:
        raise ConfigError(f"target time {text!r} has no time zone; add one (e.g. +00:00 or Z)")
    return t


def check_overwrite(data_dir: Path, overwrite: bool, confirm: str | None) -> None:
    """Replacing a data directory is destructive: it needs the flag and the directory named again."""
    if overwrite and (confirm or "") != str(data_dir):
        raise ConfigError(
            f"overwrite replaces the contents of {data_dir}: name it again to confirm "
            f"(Launchpad: confirm: {data_dir}; shell: confirm with --yes {data_dir})"
        )


@dataclass
class PitrRequest:
    database: str
    data_dir: Path
    port: int
    target_time: datetime | None = None
    target_lsn: str | None = None
    target_xid: str | None = None
    target_name: str | None = None  # a restore point made with pg_create_restore_point()
    overwrite: bool = False  # replace a non-empty data_dir (never one with a running server)
    archive: bool = False  # keep archiving from the restored cluster (it becomes the new primary)
    timeout_s: float = 600
    backup_id: str | None = None
    # read only these locations (names); None: every location that answers when recovery starts
    locations: list[str] | None = None
    accept_gaps: bool = False  # recover to the last reachable point before a gap in the WAL (confirmed)

    def __post_init__(self):
        targets = [t for t in (self.target_time, self.target_lsn, self.target_xid, self.target_name) if t]
        if len(targets) > 1:
            raise ConfigError("choose one recovery target: time, lsn, xid or restore point name (or none for latest)")
        if self.target_time is not None and self.target_time.tzinfo is None:
            raise ConfigError("the target time needs a time zone (e.g. 2026-11-23T10:15:00+00:00)")
        if self.target_xid:
            try:  # decimal or 0x..., as PostgreSQL reads it; kept in decimal
                self.target_xid = str(int(str(self.target_xid).strip(), 0))
            except ValueError:
                raise ConfigError(
                    f"target xid {self.target_xid!r} is not a transaction id "
                    "(a number, e.g. 745321 as txid_current() shows it)"
                ) from None

    @property
    def target_text(self) -> str:
        if self.target_time:
            return f"time {self.target_time.isoformat()}"
        if self.target_lsn:
            return f"LSN {self.target_lsn}"
        if self.target_xid:
            return f"xid {self.target_xid}"
        if self.target_name:
            return f"restore point {self.target_name!r}"
        return "latest"


@dataclass
class PitrReport:
    database: str
    target: str
    data_dir: str
    port: int
    started_at: str
    backup_id: str | None = None
    location: str | None = None
    locations_used: list[str] = field(default_factory=list)
    left_out: dict[str, str] = field(default_factory=dict)  # location -> why recovery did not read it
    reached_time: str | None = None
    reached_lsn: str | None = None
    stop_reason: str | None = None
    timeline: int | None = None
    data_loss_window_s: float | None = None
    rto_s: float | None = None
    promoted: bool = False
    gaps: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    tried: list[str] = field(default_factory=list)  # newer base backups the xid / restore point was not after
    steps_s: dict[str, float] = field(default_factory=dict)  # extract (fetch, verify, decode, untar), replay
    error: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def choose_base_backup(entries: list[CatalogEntry], request: PitrRequest, now: datetime) -> CatalogEntry:
    """The newest base backup that ends before the target."""
    bases = [e for e in entries if e.manifest.database == request.database and e.manifest.kind == "base"]
    if request.backup_id:
        for e in bases:
            if e.id == request.backup_id:
                return e
        raise BackupNotFound(f"base backup {request.backup_id!r} of {request.database!r} not found")
    if not bases:
        raise BackupNotFound(
            f"no base backup of {request.database!r}: point-in-time recovery needs one "
            f"(take it with `dr-pipelines backup {request.database} --kind base`)"
        )
    if request.target_time:
        if request.target_time > now:
            raise PitrError(f"target {request.target_time.isoformat()} is in the future (now {now.isoformat()})")
        ok = [e for e in bases if e.manifest.base.stopped_at <= request.target_time]
        if not ok:
            oldest = min(e.manifest.base.stopped_at for e in bases)
            raise PitrError(
                f"target {request.target_time.isoformat()} is before the oldest base backup "
                f"(consistent from {oldest.isoformat()}); nothing can be recovered to that point"
            )
        return ok[0]
    if request.target_lsn:
        ok = [e for e in bases if lsn_int(e.manifest.base.stop_lsn) <= lsn_int(request.target_lsn)]
        if not ok:
            raise PitrError(f"target LSN {request.target_lsn} is before the oldest base backup's end")
        return ok[0]
    if request.target_xid:
        return xid_candidates(bases, request.target_xid)[0]
    return bases[0]


def xid_not_before(xid: str, next_xid: str | None) -> bool | None:
    """Was transaction `xid` assigned at or after `next_xid` (a 64-bit id)? None when unknown.
    A 32-bit xid is compared as PostgreSQL does, within half the id space around it."""
    if next_xid is None:
        return None
    x, n = int(xid), int(next_xid)
    if x >= 1 << 32:
        return x >= n
    return (x - n) % (1 << 32) < 1 << 31


def xid_candidates(bases: list[CatalogEntry], xid: str) -> list[CatalogEntry]:
    """Base backups to recover to transaction `xid` from, newest first: those that ended before it
    was assigned, and those whose manifests predate recording that; failing all, the oldest."""
    ok = [e for e in bases if xid_not_before(xid, e.manifest.base.next_xid_after) is not False]
    return ok or bases[-1:]


IN_PROGRESS = ".dr_pitr_in_progress"  # in a data directory while a recovery into it runs: who runs it


def prepare_data_dir(path: Path, overwrite: bool, log: Log = lambda m: None) -> None:
    if path.exists() and any(path.iterdir()):
        if (path / "postmaster.pid").exists() and LocalCluster(path, 0).is_running():
            try:
                owner = (path / IN_PROGRESS).read_text().strip()
            except OSError:
                owner = None
            if owner is None:
                raise PitrError(f"{path} belongs to a running PostgreSQL server; never restoring over it")
            if not owner_dead(owner):
                raise PitrError(f"a recovery into {path} is running ({owner}); wait for it, or stop it first")
            if not overwrite:
                raise PitrError(
                    f"{path} holds the server of a recovery whose process died ({owner}); a retry into it needs "
                    f"overwrite: true and confirm: {path} (shell: --overwrite --yes {path})"
                )
            # a recovery killed midway (kill -9, a reboot of the tool): its half-recovered server is ours to stop
            log(f"stopping the server a killed recovery left running in {path} ({owner})")
            LocalCluster(path, 0).stop("immediate")
        if not overwrite:
            raise PitrError(f"{path} exists and is not empty; choose a new directory, or confirm overwriting it")
        shutil.rmtree(path)
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.chmod(0o700)
    chown_to_postgres(path)


def extract(
    config: DrConfig,
    entry: CatalogEntry,
    locations: dict[str, Location],
    data_dir: Path,
    identities: list | None,
    log: Log,
) -> str:
    """Stream the tar into the directory (tar runs as postgres), verifying the checksum; the first
    location with a good copy wins."""
    m = entry.manifest
    obj = m.objects[0]
    problems = []
    uid, gid = _postgres_ids()
    for name in entry.locations:
        loc = locations.get(name)
        if loc is None:
            continue
        said = tempfile.TemporaryFile()  # noqa: SIM115 -- closed below; not a pipe: tar keeps talking on a full disk
        tar = subprocess.Popen(
            ["tar", "-x", "-f", "-", "-C", str(data_dir)],
            stdin=subprocess.PIPE,
            stderr=said,
            user=uid,
            group=gid,
            extra_groups=[],
            cwd="/",
            env=tool_env(),
        )

        def tar_failure(said=said, tar=tar) -> PitrError:
            said.seek(0)
            text = " | ".join(said.read().decode(errors="replace").strip().splitlines()[-5:])
            return PitrError(
                f"tar could not extract base backup {m.id} into {data_dir} (exit {tar.returncode}): "
                f"{text or '-'}; no other copy would do better. Free space there and retry"
            )

        try:
            with loc.open_read(m.object_key(obj.name)) as f:
                src = HashingReader(f)
                decode_into(src, tar.stdin, m.compression["method"], m.encryption["method"] == "age", identities)
            tar.stdin.close()
            rc = tar.wait()
        except Exception as e:  # unreadable or corrupt (age/zstd errors): try the next copy
            tar_rc = tar.poll()
            if tar_rc is None and not isinstance(e, DecodeFailed):
                # the reader stopped (a broken pipe): tar may be exiting right now, let it say why
                try:
                    tar.stdin.close()
                except OSError:
                    pass
                try:
                    tar_rc = tar.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    tar_rc = None
            tar.kill()
            tar.wait()
            if tar_rc:  # tar itself failed (a full disk, permissions): no other copy will do better
                raise tar_failure() from None
            problems.append(f"{name}: {type(e).__name__}: {e}")
        else:
            if src.sha256.hexdigest() != obj.sha256:
                problems.append(f"{name}: {obj.name} fails its checksum")
            elif rc != 0:
                raise tar_failure()
            else:
                log(f"base backup {m.id} restored from {name} into {data_dir}")
                return name
        for child in data_dir.iterdir():  # start clean for the next location
            shutil.rmtree(child) if child.is_dir() else child.unlink()
    raise PitrError(f"no usable copy of base backup {m.id}: {'; '.join(problems)}")


RECOVERY_TARGETS = (
    "recovery_target_time",
    "recovery_target_lsn",
    "recovery_target_xid",
    "recovery_target_name",
    "recovery_target",
)


def recovery_settings(config_file: str | None, request: PitrRequest) -> dict[str, str]:
    s = {
        # --partial: the newest WAL may be wal-stream's partial segment (the last seconds before a
        # loss); served only as the end of the archive, never in place of a missing segment
        "restore_command": pg_quote(restore_command(config_file, request.database, request.locations, partial=True)),
        "recovery_target_action": "'promote'",
        "recovery_target_timeline": "'latest'",
        "port": str(request.port),
        "listen_addresses": "'127.0.0.1'",
        # our own socket, reached as the postgres OS user (peer auth), whatever pg_hba says of TCP
        "unix_socket_directories": pg_quote(str(request.data_dir)),
        "hot_standby": "on",
        "archive_mode": "on" if request.archive else "off",
    }
    if request.target_time:
        s["recovery_target_time"] = pg_quote(request.target_time.isoformat())
    elif request.target_lsn:
        s["recovery_target_lsn"] = pg_quote(request.target_lsn)
    elif request.target_xid:
        s["recovery_target_xid"] = pg_quote(request.target_xid)
    elif request.target_name:
        s["recovery_target_name"] = pg_quote(request.target_name)
    return s


_STOPPING = re.compile(r"recovery stopping (before|after|at) (.*?)(?:, time (\S+ \S+(?: \S+)?))?$", re.M)


_LAST_XACT = re.compile(r"last completed transaction was at log time (\S+ \S+(?: \S+)?)", re.M)


_REDO_DONE = re.compile(r"redo done at ([0-9A-F]+/[0-9A-F]+)", re.M)


_TIMELINE = re.compile(r"selected new timeline ID: (\d+)", re.M)


def _pg_time(text: str) -> datetime:
    t = datetime.fromisoformat(text.replace(" UTC", "+00:00").replace(" ", "T", 1))
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


def read_outcome(log_text: str, report: PitrReport) -> None:
    # "stopping before commit of X, time T": T is the first commit NOT applied; the point reached is
    # the last completed transaction PostgreSQL reports at the end of recovery.
    if m := _STOPPING.search(log_text):
        report.stop_reason = f"recovery stopping {m.group(1)} {m.group(2)}"
        if m.group(1) in ("after", "at") and m.group(3):
            report.reached_time = _pg_time(m.group(3)).isoformat()
    if m := _LAST_XACT.findall(log_text):
        report.reached_time = _pg_time(m[-1]).isoformat()
    if m := _REDO_DONE.findall(log_text):
        report.reached_lsn = m[-1]
    if m := _TIMELINE.findall(log_text):
        report.timeline = int(m[-1])


def restore_command_errors(log_text: str) -> list[str]:
    """What our restore_command said (its stderr lands in the server log): the cause PostgreSQL's
    own FATAL ("could not locate required checkpoint record") does not name."""
    return [
        ln.split("dr-pipelines: error: ", 1)[1].strip() for ln in log_text.splitlines() if "dr-pipelines: error: " in ln
    ]


def query_as_postgres(data_dir: Path, port: int, sql: str, dbname: str = "postgres") -> str | None:
    """One value from the recovered cluster through its private socket, as the postgres OS user."""
    proc = run_as_postgres(
        [
            str(DEFAULT_PG_BIN / "psql"),
            "-h",
            str(data_dir),
            "-p",
            str(port),
            "-U",
            "postgres",
            "-d",
            dbname,
            "-X",
            "-A",
            "-t",
            "-c",
            sql,
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    return proc.stdout.strip() if proc.returncode == 0 else None


def drop_inherited_targets(data_dir: Path) -> None:
    """A backup of a cluster that was itself recovered may carry old recovery targets in
    postgresql.auto.conf. PostgreSQL refuses two target kinds even if one is set to '', so the old
    lines are removed rather than overridden."""
    auto = data_dir / "postgresql.auto.conf"
    if auto.exists():
        lines = auto.read_text().splitlines(keepends=True)
        kept = [ln for ln in lines if not ln.strip().startswith("recovery_target")]
        if len(kept) != len(lines):
            auto.write_text("".join(kept))


def ensure_server_files(data_dir: Path) -> None:
    """A data directory from a Debian-style cluster (configuration in /etc) has neither
    postgresql.conf nor pg_hba.conf; give it minimal ones (local peer for postgres only)."""
    for name, text in (
        ("postgresql.conf", "# written by dr_pipelines pitr: settings are in postgresql.auto.conf\n"),
        ("pg_hba.conf", "# written by dr_pipelines pitr\nlocal all postgres peer\n"),
    ):
        path = data_dir / name
        if not path.exists():
            path.write_text(text)
            chown_to_postgres(path)


def finish_recovery(data_dir: Path, port: int) -> None:
    """After promotion the targets must not stay behind in postgresql.auto.conf: the new primary,
    and every backup taken of it, would carry them into the next recovery."""
    for t in (*RECOVERY_TARGETS, "recovery_target_action"):
        query_as_postgres(data_dir, port, f"ALTER SYSTEM RESET {t}")
    query_as_postgres(data_dir, port, "SELECT pg_reload_conf()")


def end_of_archive_check(locations: dict[str, Location], database: str, report: PitrReport) -> str | None:
    """For `latest`: did replay reach the newest archived WAL, the newest streamed partial segment
    (wal-stream's) included? (It can stop early only on a gap, which is refused before starting,
    on a segment PostgreSQL rejected, or on a partial that could not be served.)"""
    from dr_pipelines.core.postgres.wal_names import STREAM_SUFFIX, lsn_to_segment
    from dr_pipelines.core.storage.base import LocationError
    from dr_pipelines.core.wal.archive import STREAMED, _read_json, wal_prefix

    archive = list_archive(locations, database)
    newest = archive.newest()
    tip, size, what = (newest.name if newest else None), archive.segment_size, None
    partials = [n[:24] for n, f in archive.files.items() if f.kind == STREAMED]
    streamed = max(partials, key=lambda n: n[8:] + n[:8], default=None)
    if streamed and (tip is None or streamed[8:] > tip[8:]):
        tip, what = streamed, "the streamed partial segment " + streamed + STREAM_SUFFIX
        for loc in locations.values():
            try:
                side = _read_json(loc, f"{wal_prefix(database)}/{streamed[:8]}/{streamed}{STREAM_SUFFIX}.json")
            except (LocationError, ValueError):
                continue
            if side:
                size = size or side.get("segment_size")
                what += f" (WAL up to {side.get('end_lsn')})"
                break
    if not tip or not report.reached_lsn or not size:
        return None
    reached = lsn_to_segment(report.reached_lsn, int(tip[:8], 16), size)
    if reached[8:] < tip[8:]:
        return (
            f"replay stopped at {report.reached_lsn} (segment {reached[8:]}) but the archive holds WAL up to "
            f"{what or tip}: recovery ended before the end of the archive"
        )
    return None


def archive_gaps(locations: dict[str, Location], entry: CatalogEntry) -> list[str]:
    """Missing segments after the base backup's first segment, on its timeline and later ones."""
    archive = list_archive(locations, entry.manifest.database)
    start = entry.manifest.base.wal_start
    if archive.segments and not archive.segment_size:
        return ["unknown (the archive's segment size could not be read)"]
    out = []
    for tli in archive.segments:
        for a, b in archive.gaps(tli):
            if b >= start or tli > int(start[:8], 16):
                out.append(f"{a}..{b}" if a != b else a)
    return out


TARGET_BEFORE_BACKUP = (
    "recovery ended before configured recovery target was reached",
    "requested recovery stop point is before consistent recovery point",
)


def _replay(
    config: DrConfig,
    config_file: str | None,
    request: PitrRequest,
    entry: CatalogEntry,
    locations: dict[str, Location],
    report: PitrReport,
    log: Log,
    overwrite: bool,
) -> LocalCluster:
    """Restore `entry` into the data directory and replay WAL until the server is promoted."""
    identities = load_identities(config) if entry.manifest.encryption.get("method") == "age" else None
    prepare_data_dir(request.data_dir, overwrite, log)
    (request.data_dir / IN_PROGRESS).write_text(owner_tag())  # until it is promoted: a kill leaves it
    t0 = time.monotonic()
    report.location = extract(config, entry, locations, request.data_dir, identities, log)
    report.steps_s["extract"] = round(time.monotonic() - t0, 3)
    for stale in ("postmaster.pid", "standby.signal"):
        (request.data_dir / stale).unlink(missing_ok=True)
    cluster = LocalCluster(request.data_dir, request.port)
    ensure_server_files(request.data_dir)
    drop_inherited_targets(request.data_dir)
    cluster.write_settings(recovery_settings(config_file, request))
    (request.data_dir / "recovery.signal").touch()
    chown_to_postgres(request.data_dir / "recovery.signal")
    log(f"replaying WAL from base backup {entry.id} to {request.target_text} on port {request.port} ...")
    try:
        cluster.start(timeout=request.timeout_s, env=server_env(config))
    except Exception:
        pass  # it may have stopped already (recovery ended before the target): the log says why
    deadline = time.monotonic() + request.timeout_s
    # PostgreSQL removes recovery.signal as recovery ends, before its end-of-recovery checkpoint and
    # promotion: a stat every 50 ms until then, and the two checks that start a process (pg_ctl
    # status, psql as the postgres user) each quarter second; once the file is gone, every 0.1 s.
    recovery_signal, checked = request.data_dir / "recovery.signal", 0.0

    def server_log() -> str:
        return cluster.log_file.read_text(errors="replace") if cluster.log_file.exists() else ""

    while True:
        if recovery_signal.exists() and time.monotonic() - checked < 0.25:
            time.sleep(0.05)
            continue
        checked = time.monotonic()
        if not cluster.is_running():
            time.sleep(0.2)  # the log written just before the exit, read after it
            log_text = server_log()
            read_outcome(log_text, report)
            # the server's own reason, not a client turned away while it was starting ("the database
            # system is starting up / in recovery mode"): those FATALs can come last
            fatal = [
                ln
                for ln in log_text.splitlines()
                if ("FATAL" in ln or "PANIC" in ln) and "the database system is" not in ln
            ]
            report.error = (
                f"recovery stopped without reaching {request.target_text}: "
                f"{fatal[-1] if fatal else 'the server exited'}"
                + (
                    f"; restore_command said: {restore_command_errors(log_text)[-1]}"
                    if restore_command_errors(log_text)
                    else ""
                )
                + (
                    "; last reachable point: "
                    + (
                        f"{report.reached_time} (LSN {report.reached_lsn})"
                        if report.reached_lsn
                        else "none (replay never started)"
                    )
                )
                + (f"; WAL missing from the archive: {', '.join(report.gaps)}" if report.gaps else "")
                + f". The server log is {cluster.log_file}; {request.data_dir} is left as it is for a look,"
                f" and a retry into it needs overwrite: true and confirm: {request.data_dir}"
                f" (shell: --overwrite --yes {request.data_dir})"
            )
            raise PitrFailed(report)
        if query_as_postgres(request.data_dir, request.port, "SELECT pg_is_in_recovery()") == "f":
            report.steps_s["replay"] = round(time.monotonic() - t0 - report.steps_s["extract"], 3)
            (request.data_dir / IN_PROGRESS).unlink(missing_ok=True)  # a recovered cluster: never stopped by a retry
            return cluster
        if time.monotonic() > deadline:
            cluster.stop("fast")
            read_outcome(server_log(), report)
            report.error = f"replay did not finish within {request.timeout_s:.0f}s; reached {report.reached_lsn}"
            raise PitrFailed(report)
        time.sleep(0.1)


def recovery_locations(
    config: DrConfig, request: PitrRequest, locations: dict[str, Location], report: PitrReport, log: Log
) -> dict[str, Location]:
    """The locations recovery reads: those named, or those that answer now. PostgreSQL's recovery
    aborts when restore_command cannot rule a file out, so a down location must not be asked at all;
    the report says which was left out and what that may cost."""
    chosen, left = usable_locations(config, locations, request.locations)
    if left and not request.locations:
        request.locations = list(chosen)  # restore_command then names only these
    report.locations_used, report.left_out = list(chosen), left
    for name, why in left.items():
        warning = (
            f"location {name} was left out ({why}): a base backup or WAL held only there was not used, "
            "so recovery may stop earlier than the newest point"
        )
        report.warnings.append(warning)
        log(f"WARNING: {warning}")
    return chosen


def run_pitr(
    config: DrConfig,
    config_file: str | None,
    request: PitrRequest,
    locations: dict[str, Location],
    log: Log = lambda m: None,
) -> PitrReport:
    t0 = time.monotonic()
    now = datetime.now(timezone.utc)
    report = PitrReport(request.database, request.target_text, str(request.data_dir), request.port, now.isoformat())
    config.database(request.database)
    if config_file and run_as_postgres(["test", "-r", str(Path(config_file).resolve())]).returncode != 0:
        raise PitrError(
            f"the postgres user cannot read {config_file}; restore_command runs as postgres. "
            "Move the config (and the age identity) where postgres can read them"
        )
    locations = recovery_locations(config, request, locations, report, log)
    catalog = load_catalog(locations.values(), request.database, "base")
    entry = choose_base_backup(catalog.entries, request, now)
    report.backup_id = entry.id
    report.gaps = archive_gaps(locations, entry)
    if report.gaps and request.accept_gaps:
        report.warnings.append(
            f"the WAL archive has a gap after base backup {entry.id} (missing {', '.join(report.gaps)}): "
            "recovery stops at the last segment before it, as confirmed"
        )
    elif report.gaps and not (request.target_time or request.target_lsn or request.target_xid or request.target_name):
        raise PitrError(
            f"the WAL archive has a gap after base backup {entry.id}: missing {', '.join(report.gaps)}. "
            "Recovery to 'latest' would stop at the gap and promote early; choose a target before "
            "the gap (the last reachable point is the end of the segment before it)"
        )
    # Where an xid or a restore point lies in WAL is unknown until replay meets it: start from the
    # newest base backup and, if the target came before it, from the next older one, and so on.
    candidates = [entry]
    if (request.target_xid or request.target_name) and not request.backup_id:
        bases = [e for e in catalog.entries if e.manifest.database == request.database and e.manifest.kind == "base"]
        if request.target_xid:
            bases = xid_candidates(bases, request.target_xid)
        candidates += bases[bases.index(entry) + 1 :]
    for i, entry in enumerate(candidates):
        report.backup_id, report.gaps = entry.id, archive_gaps(locations, entry)
        try:
            cluster = _replay(
                config, config_file, request, entry, locations, report, log, overwrite=request.overwrite or i > 0
            )
            break
        except PitrFailed as e:
            error = e.report.error or ""
            # an older base backup helps only if the target lies before this one: not when the end
            # of recovery came from missing WAL
            before_consistent = TARGET_BEFORE_BACKUP[1] in error
            ended_early = TARGET_BEFORE_BACKUP[0] in error and not e.report.gaps
            if i + 1 == len(candidates) or not (before_consistent or ended_early):
                raise
            report.tried.append(entry.id)
            report.error = report.reached_time = report.reached_lsn = report.stop_reason = None
            log(
                f"{request.target_text} was not found after base backup {entry.id} (it may lie before it): "
                f"trying the older base backup {candidates[i + 1].id}"
            )
    report.promoted = True
    report.rto_s = round(time.monotonic() - t0, 3)
    finish_recovery(request.data_dir, request.port)
    if request.target_text == "latest":
        behind = end_of_archive_check(locations, request.database, report)
        if behind:
            report.warnings.append(behind)
            log(f"WARNING: {behind}")
    from dr_pipelines.core.wal.fast_path import SPOOL

    shutil.rmtree(request.data_dir / "pg_wal" / SPOOL, ignore_errors=True)  # prefetched, never replayed
    read_outcome(cluster.log_file.read_text(errors="replace"), report)
    if report.reached_time:  # what the restored cluster lacks compared with the moment we started
        report.data_loss_window_s = round(
            max(0.0, (now - datetime.fromisoformat(report.reached_time)).total_seconds()), 3
        )
    log(
        f"promoted on timeline {report.timeline} at {report.reached_time} (LSN {report.reached_lsn}); "
        f"RTO {report.rto_s:.1f}s"
    )
    return report


class PitrFailed(PitrError):
    def __init__(self, report: PitrReport):
        super().__init__(report.error)
        self.report = report
