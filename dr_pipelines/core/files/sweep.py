"""What a killed snapshot leaves, found and removed by the next one: temp files of the manifest on
this host (they hold file names), temp objects and unfinished uploads under `_files/`, and an index
whose manifest was never written. Its packs are not leftovers: the next snapshot reuses them (the
host's chunk table knows them), and pack collection removes them once no snapshot does."""

from __future__ import annotations

import json
from datetime import datetime, timezone

from dr_pipelines.core.config import DrConfig
from dr_pipelines.core.files import format as fmt
from dr_pipelines.core.files.locks import LOCKS
from dr_pipelines.core.log import Log
from dr_pipelines.core.owner import owner_dead
from dr_pipelines.core.repository.records import RecordKind, load_reports
from dr_pipelines.core.storage.base import Location, LocationError
from dr_pipelines.core.sweep import GRACE, Leftover, _stale, orphan_reason, orphans, repository_leftovers, sweep_safely


def snapshot_leftovers(config: DrConfig, locations: dict[str, Location], now: datetime) -> list[Leftover]:
    out = repository_leftovers(locations, fmt.ROOT, now)
    tmp = config.files.resolved_state_dir(config.base_dir) / "tmp"
    if tmp.is_dir():
        for path in tmp.iterdir():
            # <what>-<snapshot id>.<owner, ':' as '+'>.<suffix>; a host name may hold dots
            rest = path.name.split(".", 1)[1] if "." in path.name else ""
            owner = rest.rsplit(".", 1)[0].replace("+", ":") if "." in rest else None
            started = datetime.fromtimestamp(path.stat().st_mtime, timezone.utc)
            if path.name.startswith("packs-") and now - started < GRACE:
                continue  # a killed run's journal of stored packs: the next snapshot adopts it
            if why := _stale(owner, started, now):
                out.append(Leftover("snapshot temp file (file names)", "this host", str(path), why, path.unlink))
    for loc in locations.values():  # locks of snapshots or collections whose process died
        try:
            for obj in loc.list(LOCKS):
                try:
                    owner = json.loads(loc.get_bytes(obj.key))["owner"]
                except (LocationError, ValueError, KeyError):
                    continue
                if owner_dead(owner):
                    out.append(
                        Leftover(
                            "lock",
                            loc.name,
                            obj.key,
                            f"its process ({owner}) is gone",
                            lambda loc=loc, k=obj.key: loc.delete(k),
                        )
                    )
        except LocationError:
            continue
    for file_set in config.file_sets:
        attempts = load_reports(locations, fmt.records_owner(file_set), RecordKind.BACKUP_ATTEMPT)
        dead = {a.backup_id for a in attempts if a.known_dead()}  # another host's: the grace period
        running = {a.backup_id for a in attempts if a.running()}
        finished = {a.backup_id for a in attempts if a.finished_at is not None}
        for loc in locations.values():
            try:
                found: dict[str, list] = {}
                for obj in loc.list(fmt.set_prefix(file_set) + "/"):
                    parsed = fmt.parse_snapshot_key(obj.key)
                    if parsed is not None:
                        found.setdefault(parsed[1], []).append(obj)
            except LocationError:
                continue
            for snapshot_id, objs in found.items():
                if snapshot_id in running or any(o.key.rsplit("/", 1)[1].startswith("manifest.") for o in objs):
                    continue
                if all(o.key.endswith("/" + fmt.PIN) for o in objs):
                    continue  # a pin left after the snapshot went: harmless, removed with retention
                why = orphan_reason(snapshot_id, objs, dead, finished, now)
                out += orphans(loc, objs, why, "snapshot object without a manifest")
    return out


def sweep_snapshot_leftovers(config: DrConfig, locations: dict[str, Location], log: Log) -> None:
    sweep_safely(lambda: snapshot_leftovers(config, locations, datetime.now(timezone.utc)), log)
