"""What killed runs leave behind, found (for `status`) and removed (by the next run).

A backup, restore or PITR killed midway (kill -9, out of memory, a reboot) runs none of its own
cleanup. What it leaves: temp files and unfinished multipart uploads in the locations, objects of
a backup that never got its manifest, the private directory holding a decrypted dump, and a
staging database on the server. Each is removed only when its maker is known to be dead (its
process, on this host) or, where the maker cannot be asked, once it is older than GRACE: a run in
progress is never swept from under itself.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Container
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

from dr_pipelines.core.config import DatabaseConfig, DrConfig
from dr_pipelines.core.log import Log
from dr_pipelines.core.owner import owner_dead, owner_tag
from dr_pipelines.core.repository.manifest import MANIFEST
from dr_pipelines.core.repository.records import RecordKind, load_reports
from dr_pipelines.core.storage.base import Location, LocationError, ObjectInfo

GRACE = timedelta(hours=6)  # for what no process can be asked about
SCRATCH_PREFIX = "dr-restore-"
DRILL_PREFIX = "dr-pitr-test-"
OWNER_FILE = ".owner"  # in a scratch directory: who made it
STAGING_MARK = "__restoring_"


@dataclass
class Leftover:
    what: str
    where: str
    name: str
    why: str
    remove: Callable[[], None] = field(repr=False, compare=False)

    def describe(self) -> str:
        return f"{self.what} {self.name} on {self.where} ({self.why})"


def _stale(owner: str | None, started: datetime | None, now: datetime) -> str | None:
    """Why it is a leftover, or None while its maker may still be at work."""
    dead = owner_dead(owner)
    if dead is False:
        return None
    age = now - started if started else None
    if dead:
        return f"its process ({owner}) is gone"
    if age is not None and age >= GRACE:
        return f"untouched for {age.total_seconds() / 3600:.0f} h"
    return None


def repository_leftovers(locations: dict[str, Location], database: str, now: datetime) -> list[Leftover]:
    """Temp files, unfinished uploads and manifest-less backup objects of one database."""
    attempts = load_reports(locations, database, RecordKind.BACKUP_ATTEMPT)
    dead = {a.backup_id for a in attempts if a.known_dead()}  # another host's: the grace period
    running = {a.backup_id for a in attempts if a.running()}
    finished = {a.backup_id for a in attempts if a.finished_at is not None}
    out: list[Leftover] = []
    for loc in locations.values():
        try:
            for item in loc.unfinished(f"{database}/"):
                parts = item.key.split("/")
                if len(parts) > 2 and parts[2] in running:
                    continue  # part of a backup still running (a large one may take hours)
                if why := _stale(item.owner, item.started, now):
                    out.append(
                        Leftover(item.what, loc.name, item.key, why, lambda loc=loc, item=item: loc.discard(item))
                    )
            objects: dict[str, list] = {}
            for obj in loc.list(f"{database}/"):
                parts = obj.key.split("/")
                if len(parts) == 4 and parts[1] in ("logical", "base"):  # <db>/<kind>/<id>/<file>
                    objects.setdefault("/".join(parts[:3]), []).append(obj)
        except LocationError:
            continue  # a location that does not answer is reported by the other checks
        for prefix, objs in objects.items():
            backup_id = prefix.rsplit("/", 1)[1]
            if any(o.key.endswith("/" + MANIFEST) for o in objs) or backup_id in running:
                continue
            out += orphans(loc, objs, orphan_reason(backup_id, objs, dead, finished, now), "object without a manifest")
    return out


def orphan_reason(
    backup_id: str, objs: list[ObjectInfo], dead: Container[str | None], finished: Container[str | None], now: datetime
) -> str | None:
    """Why the objects of a backup (or snapshot) that has no manifest are leftovers, or None while
    a run may still be writing them. The one rule, for backups and snapshots alike."""
    if backup_id in dead:
        return "its attempt died"
    if backup_id in finished:
        return "its attempt finished without a manifest here (failed, or removed by a retention that was killed)"
    newest = max((o.modified for o in objs if o.modified), default=None)
    if newest and now - newest >= GRACE:
        return f"no manifest, untouched for {(now - newest).total_seconds() / 3600:.0f} h"
    return None


def orphans(loc: Location, objs: list[ObjectInfo], why: str | None, what: str) -> list[Leftover]:
    if why is None:
        return []
    return [Leftover(what, loc.name, o.key, why, lambda loc=loc, key=o.key: loc.delete(key)) for o in objs]


def scratch_base(db: DatabaseConfig) -> Path:
    return Path(db.scratch_dir or tempfile.gettempdir())


def make_scratch_dir(path: Path) -> None:
    """The private 0700 directory for plaintext, marked with who made it."""
    path.mkdir(mode=0o700, parents=False, exist_ok=False)
    (path / OWNER_FILE).write_text(owner_tag())


def scratch_leftovers(config: DrConfig, now: datetime) -> list[Leftover]:
    """Private directories of restores and PITR drills whose process died: they may hold a
    decrypted dump, or a whole recovered cluster (stopped before it is removed)."""
    out: list[Leftover] = []
    bases = {scratch_base(db) for db in config.databases.values()} | {
        Path(db.scratch_dir or "/var/tmp") for db in config.databases.values()
    }
    for base in sorted(bases):
        paths = [*base.glob(f"{SCRATCH_PREFIX}*"), *base.glob(f"{DRILL_PREFIX}*")] if base.is_dir() else []
        for path in paths:
            try:
                owner = (path / OWNER_FILE).read_text().strip()
            except OSError:
                owner = None
            try:
                started = datetime.fromtimestamp(path.stat().st_mtime, timezone.utc)
            except FileNotFoundError:
                continue
            if why := _stale(owner, started, now):
                what = (
                    "restore scratch directory (may hold plaintext)"
                    if path.name.startswith(SCRATCH_PREFIX)
                    else "PITR drill directory (a recovered cluster)"
                )
                out.append(
                    Leftover(
                        what,
                        "this host",
                        str(path),
                        why,
                        lambda path=path: _remove_scratch(path),
                    )
                )
    return out


def _remove_scratch(path: Path) -> None:
    if (path / "data" / "postmaster.pid").exists():  # a drill's recovered cluster, still running
        from dr_pipelines.core.postgres.cluster import LocalCluster

        LocalCluster(path / "data", 0).stop("immediate")
    shutil.rmtree(path, ignore_errors=True)


def staging_leftovers(config: DrConfig, database: str) -> list[Leftover]:
    """Staging databases (`…__restoring_…`) and restore-test scratch databases whose process died."""
    from psycopg import sql

    from dr_pipelines.core.postgres.client import connect

    out: list[Leftover] = []
    db = config.database(database)
    for server in {(db.host, db.port): db, (db.test_server().host, db.test_server().port): db.test_server()}.values():
        try:
            with connect(server, database, dbname="postgres", autocommit=True) as conn:
                rows = conn.execute(
                    "SELECT d.datname, shobj_description(d.oid, 'pg_database') FROM pg_database d "
                    "WHERE d.datname LIKE %s OR d.datname LIKE 'dr\\_restore\\_test\\_%%'",
                    ("%" + STAGING_MARK.replace("_", "\\_") + "%",),  # _ is a LIKE wildcard
                ).fetchall()
        except Exception:  # unreachable, a password variable unset...: the other checks say so
            continue
        for name, comment in rows:
            owner = (
                (comment or "").removeprefix(STAGING_COMMENT) if (comment or "").startswith(STAGING_COMMENT) else None
            )
            if owner_dead(owner):

                def drop(server=server, name=name) -> None:
                    with connect(server, database, dbname="postgres", autocommit=True) as c:
                        c.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))

                out.append(
                    Leftover(
                        "staging database", f"{server.host}:{server.port}", name, f"its process ({owner}) is gone", drop
                    )
                )
    return out


STAGING_COMMENT = "dr_pipelines restore in progress, by "


def keep_database(conn, dbname: str) -> None:
    """A database that stays (swapped in, or kept on purpose) loses its in-progress mark."""
    from psycopg import sql

    conn.execute(sql.SQL("COMMENT ON DATABASE {} IS NULL").format(sql.Identifier(dbname)))


def sweep_safely(find: Callable[[], list[Leftover]], log: Log) -> list[Leftover]:
    """Best effort: a sweep that cannot look (a location down, a server away) never stops the run."""
    try:
        found = find()
    except Exception as e:
        log(f"warning: could not look for leftovers of killed runs ({e}); the next run tries again")
        return []
    return sweep(found, log)


def sweep(leftovers: list[Leftover], log: Log) -> list[Leftover]:
    """Remove them; what cannot be removed now is said and left for the next run."""
    removed = []
    for item in leftovers:
        try:
            item.remove()
        except Exception as e:
            log(f"warning: could not remove the leftover {item.describe()}: {e}")
            continue
        log(f"removed a leftover of a killed run: {item.describe()}")
        removed.append(item)
    return removed
